"""The machinery guard (SPEC "Failure behaviour": a fault of the machinery is never an exclusion).

An image is refused in one of two ways. A rule refuses it: too small, a refused format or mode, too
large, an empty file, Pillow's decompression-bomb check; the rule looked at the image and said no.
Or an exception ends the work on it: Pillow raises OSError, SyntaxError, ValueError, EOFError,
struct.error, IndexError, KeyError, TypeError, ZeroDivisionError... on bad bytes, but a bug of ours
or a library's incompatible change raises the same types, on every image. (No plugin accepting the
bytes, UnidentifiedImageError, counts as an exception too: Pillow skips a plugin that raises
TypeError, IndexError, struct.error or SyntaxError, so a broken plugin reads as "not an image".)

So an exception is recorded as the image's exclusion only once the same code path (the same
function, with the same settings) has passed a control: an image made here, known good, of the
failing image's kind (image/controls.py: its format, every format the release decodes having a
control of its own; its mode; progressive or not; cut short like it, or when the failure came
from the repair of data cut short, so that the control takes the repair path too). If the control
fails too, the machinery is broken: ``MachineryFault``, which fails the index or the shard run and
records nothing, so that the build after the fix builds every image. ``settle`` is that one rule;
probe_image, decode (for a repair made after an exception), trial_decode, encode_or_refusal and
the pHash's thumbnail (perceptual.grey_thumbnail, with a complete control: the hash repairs
nothing) each call it with their own path. A crash (a signal kills the encode worker: no
exception to settle) is settled by stages/crash_control.py with these controls, run in a worker;
``crash_fault`` is its fault.

No threshold, and no verdict cached: the control runs at every such failure (a few to ~50 ms; such
failures are rare in a real release), so a machine that breaks later in a process is caught at
its first failure. The control images themselves are made once per process (per kind and size).
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable

from PIL import __version__ as PIL_VERSION

from imnet_assets.image.controls import ControlKind, control_for, control_image


class MachineryFault(RuntimeError):
    """Probing or encoding an image failed, and a known-good control image failed the same code
    path: the fault is in the code or its libraries, not in the image. Never an exclusion: it fails
    the stage or shard run that met it, and nothing is recorded for the image."""


ERROR_CHARS = 500  # an exception's message in a reason or a fault: the first this many characters


def describe_error(exc: BaseException) -> str:
    """``Type: message`` with object addresses removed, so reasons are deterministic, and a message
    longer than ERROR_CHARS cut there, its length said (a decoder's message can quote the bytes it
    read; an exclusion's reason goes into the manifest, the catalog and the card). The one place
    an exception's text becomes part of an exclusion's reason."""
    msg = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)).strip()
    if len(msg) > ERROR_CHARS:
        msg = f"{msg[:ERROR_CHARS]}… ({len(msg):,} characters)"
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else name


def _raised_at(exc: BaseException) -> str:
    """Where ``exc`` was raised: `folder/file.py:line in function` of its innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    where = os.path.join(os.path.basename(os.path.dirname(f.filename)), os.path.basename(f.filename))
    return f" (raised at {where}:{f.lineno} in {f.name})"


# --------------------------------------------------------------------------------- the rule


def settle(
    path: str,
    error: BaseException,
    data,
    attempt: Callable[[bytes], str | None],
    max_short: int,
    cut: bool | None = None,
) -> None:
    """``error`` ended ``path`` (what was being done, and with which settings) on the image ``data``.
    Returns when the image is at fault: ``attempt`` (the same path, on other bytes; returns None
    when they pass, else why not, or raises) passes the control of the image's kind. Raises
    MachineryFault when the control fails too. MemoryError propagates (memory is no property of
    an image, nor a verdict on the machinery). ``cut`` (controls.control_for): True when ``error``
    came from the repair of data cut short (the control is cut short, so it is repaired too, where
    its format can be); False when the path repairs nothing (a cut image fails it by design: the
    perceptual hash), so its control is never cut; None, cut when the image looks cut.
    An OSError that carries an errno (a full disk or quota, an I/O error, too many open files: a
    codec that stages through a temporary file meets them) propagates as it is, before any control:
    it is the machine's, never the image's (Pillow's errors on bad bytes carry none), and a control
    run on the same full disk would only call the code broken."""
    if isinstance(error, OSError) and error.errno is not None:
        raise error
    kind = control_for(data, max_short, cut=cut)
    seen = f"{path} failed with {describe_error(error)}{_raised_at(error)}"
    try:
        control = control_image(kind)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow cannot even write a known-good image
        raise MachineryFault(
            f"machinery fault: {seen}, and a known-good control image ({kind.describe()}) could not even be made: "
            f"{describe_error(e)}{_raised_at(e)}. {_ADVICE}"
        ) from error
    try:
        failed = attempt(control)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - the control's failure, whatever it is
        failed = f"{describe_error(e)}{_raised_at(e)}"
    if failed is not None:
        raise MachineryFault(
            f"machinery fault: {seen}, and it failed on a known-good {kind.describe()} control image made in "
            f"memory too ({failed}). {_ADVICE}"
        ) from error


def crash_fault(seen: str, kind: ControlKind, failed: str) -> MachineryFault:
    """The fault when a process crashed (a crash signal: workerpool.CRASH_SIGNALS) on an image, as
    ``seen`` says, and the control of its kind, run the same way in a fresh process, ``failed``
    too ("crashed the encoder's process the same way (signal 11 (SIGSEGV))"): a codec library
    broken for every input, not the image (stages/crash_control.py)."""
    return MachineryFault(
        f"machinery fault: {seen}, and a known-good {kind.describe()} control image made in memory {failed}. "
        f"{_ADVICE}"
    )


_ADVICE = (
    f"The fault is in the code or its libraries (a bug, an incompatible Pillow or a broken build of a codec "
    f"library; this is Pillow {PIL_VERSION}), "
    "not in the image: nothing was recorded as excluded; fix it and build again"
)
