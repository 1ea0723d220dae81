"""Tests of the benchmarks' measurement logic (bench/): each compares figures measured the same way on both sides."""
