import signal

from autoprune.cli import main

code = main()
# The command has ended and said how: a signal while the interpreter shuts down must not turn
# its exit code into a death by that signal (a `search --workers` parent would count a worker
# that finished its work as failed).
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
raise SystemExit(code)
