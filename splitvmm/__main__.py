from splitvmm.cli import main

main()
