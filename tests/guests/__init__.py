"""Freestanding test guests (C + GNU assembly) and their build: see README.md and build.py."""
