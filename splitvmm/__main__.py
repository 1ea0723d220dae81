from splitvmm import timings

timings.mark("start")  # the interpreter is up: what follows is ours (up --timings)

from splitvmm.cli import main  # noqa: E402

main()
