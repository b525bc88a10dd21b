"""The phases of a training step, by name, for whoever times them (bench.py).

`@phase` marks a function as a phase, named after it ("rollout.decode"). While a listener is set
(`listen`), it hears each marked function start and end; otherwise, in every run but bench.py's,
a mark costs one check per call and changes nothing.
"""
import contextlib
import functools

_listener = None  # listener(name, started), while `listen` holds


def phase(fn):
    """`fn`, marked as the phase module.function."""
    name = f"{fn.__module__}.{fn.__name__}"

    @functools.wraps(fn)
    def marked(*args, **kwargs):
        if _listener is None:
            return fn(*args, **kwargs)
        _listener(name, True)
        try:
            return fn(*args, **kwargs)
        finally:
            _listener(name, False)

    return marked


@contextlib.contextmanager
def listen(listener):
    """listener(name, started) hears every marked function start (True) and end (False) in this context."""
    global _listener
    _listener = listener
    try:
        yield
    finally:
        _listener = None
