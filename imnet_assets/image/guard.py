"""The machinery guard (SPEC "Failure behaviour": a fault of the machinery is never an exclusion).

An image is refused in one of two ways. A rule refuses it: too small, a refused format or mode, too
large, an empty file, Pillow's decompression-bomb check; the rule looked at the image and said no.
Or an exception ends the work on it: Pillow raises OSError, SyntaxError, ValueError, EOFError,
struct.error, IndexError, KeyError, TypeError, ZeroDivisionError... on bad bytes, but a bug of ours
or a library's incompatible change raises the same types, on every image. (No plugin accepting the
bytes, UnidentifiedImageError, counts as an exception too: Pillow skips a plugin that raises
TypeError, IndexError, struct.error or SyntaxError, so a broken plugin reads as "not an image".)

So an exception is recorded as the image's exclusion only once the same code path (the same
function, with the same settings) has passed a control: an image made here with Pillow, known
good, of the failing image's kind (``control_for``: the format family its first bytes name, its
mode and, for JPEG, progressive or not when its header says so, and cut short like it when it
lacks its end marker; what the header does not say, the family's usual kind). If the control fails
too, the machinery is broken: ``MachineryFault``, which fails the index or the shard run and
records nothing, so that the build after the fix builds every image. ``settle`` is that one rule;
probe_image, trial_decode, encode_or_refusal and the pHash's thumbnail (perceptual.grey_thumbnail,
with a complete control: the hash repairs nothing) each call it with their own path. A crash (a
signal kills the encode worker: no exception to settle) is settled by stages/crash_control.py with
these controls, run in a worker; ``crash_fault`` is its fault.

No threshold, and no verdict cached: the control runs at every such failure (a few to ~50 ms; such
failures are rare in a real release), so a machine that breaks later in a process is caught at
its first failure. The control images themselves are made once per process (per kind and size).
"""

from __future__ import annotations

import functools
import io
import os
import re
import traceback
from collections.abc import Callable
from typing import NamedTuple

from PIL import Image
from PIL import __version__ as PIL_VERSION

from imnet_assets.image.formats import family, looks_truncated


class MachineryFault(RuntimeError):
    """Probing or encoding an image failed, and a known-good control image failed the same code
    path: the fault is in the code or its libraries, not in the image. Never an exclusion: it fails
    the stage or shard run that met it, and nothing is recorded for the image."""


def describe_error(exc: BaseException) -> str:
    """``Type: message`` with object addresses removed, so reasons are deterministic."""
    msg = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)).strip()
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


# --------------------------------------------------------------------------------- the controls

# Per family, the modes a control can be made in (each verified to pass every path: tests/core/
# test_guard.py) and the usual one, for an image whose header says nothing readable.
_MODES = {
    "JPEG": ("RGB", "L", "CMYK"),
    "PNG": ("RGB", "L", "LA", "P", "RGBA", "1", "I;16"),
    "GIF": ("P",),
    "BMP": ("RGB", "L", "P", "1"),
    "TIFF": ("RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16"),
    "WEBP": ("RGB", "RGBA"),
}
_CUT_FAMILIES = frozenset({"JPEG", "PNG"})  # a control cut short still decodes (repaired) in these
_CUT_AT = 0.9  # the fraction of a cut control's bytes kept (a progressive JPEG keeps its first scans)
_MAX_DRAFT_CONTROL_SIDE = 2048  # a JPEG control is drafted (short side > 2 x max_short) up to this side
_MIN_CONTROL_SIDE = 256


class ControlKind(NamedTuple):
    family: str
    mode: str
    progressive: bool
    cut: bool
    max_short: int

    def describe(self) -> str:
        size = "x".join(map(str, control_size(self.family, self.max_short)))
        return f"{self.family} {self.mode}{' progressive' if self.progressive else ''} {size}" + (
            " cut short" if self.cut else ""
        )


def control_size(fam: str, max_short: int) -> tuple[int, int]:
    """Large enough to be resized (and a JPEG, drafted: short side over twice ``max_short``, up to
    _MAX_DRAFT_CONTROL_SIDE), landscape so the long side is rounded; at least _MIN_CONTROL_SIDE, so
    that a cut control keeps its header and first scans."""
    short = (
        2 * max_short + 16
        if fam == "JPEG" and 2 * max_short + 16 <= _MAX_DRAFT_CONTROL_SIDE
        else max_short + 16
    )
    short = max(short, _MIN_CONTROL_SIDE)
    return short + short // 3, short


_plugins_ready = False


def _header(data, fam: str) -> tuple[str | None, bool]:
    """(mode, progressive) from the failing image's header, read by its family's plugin, or
    (None, False) when that parse fails too."""
    global _plugins_ready
    if not _plugins_ready:
        Image.preinit()
        Image.init()
        _plugins_ready = True
    opener = Image.OPEN.get(fam)
    if opener is None:
        return None, False
    try:
        img = opener[0](io.BytesIO(bytes(data)), "")
    except Exception:  # noqa: BLE001 - nothing readable: the family's usual kind
        return None, False
    with img:
        return img.mode, fam == "JPEG" and bool(img.info.get("progressive"))


def control_for(data, max_short: int, header: bool = True) -> ControlKind:
    """The control of the failing image ``data``'s kind (see the module's docstring). ``header=False``:
    from what the bytes say without a decoder only (the family's usual kind; for an image whose
    header crashed the process that read it)."""
    fam = family(data) or "JPEG"  # no family named: the path nearly every source takes
    mode, progressive = _header(data, fam) if header else (None, False)
    if mode not in _MODES[fam]:
        mode = _MODES[fam][0]
    cut = fam in _CUT_FAMILIES and looks_truncated(data, fam)
    return ControlKind(fam, mode, progressive, cut, max_short)


def _picture(size: tuple[int, int], mode: str) -> Image.Image:
    """A photo-like picture (gradients and detail, no flat areas, no grey corners) in ``mode``."""
    small = (256, 192)
    x = Image.linear_gradient("L").rotate(90).resize(small)
    y = Image.linear_gradient("L").resize(small)
    detail = Image.effect_mandelbrot(small, (-2.2, -1.2, 1.0, 1.2), 64)
    if mode == "P":  # quantized small: a palette of the whole picture costs ~0.3 s
        return Image.merge("RGB", (x, y, detail)).quantize(64, dither=Image.Dither.NONE).resize(size)
    rgb = Image.merge("RGB", (x, y, detail)).resize(size, Image.Resampling.BICUBIC)
    if mode == "1":
        return rgb.convert("L").convert("1")
    if mode == "I;16":
        return rgb.convert("L").point(lambda v: v * 257, "I").convert("I;16")
    if mode in ("LA", "RGBA"):
        img = rgb.convert(mode)
        img.putalpha(x.resize(size))
        return img
    return rgb.convert(mode)


def _metadata() -> dict:
    """A colour-space EXIF tag (ColorSpace sRGB) and an sRGB ICC profile: the metadata rules run too."""
    exif = Image.Exif()
    exif[0x8769] = {0xA001: 1}
    meta = {"exif": exif.tobytes()}
    try:
        from PIL import ImageCms

        meta["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    except ImportError:  # Pillow without littlecms: no profile
        pass
    return meta


@functools.lru_cache(maxsize=32)
def control_image(kind: ControlKind) -> bytes:
    """The control's bytes (made once per process per kind)."""
    img = _picture(control_size(kind.family, kind.max_short), kind.mode)
    options: dict = {}
    if kind.family in ("JPEG", "PNG", "WEBP") and kind.mode == "RGB":
        options.update(_metadata())
    if kind.family in ("JPEG", "WEBP"):
        options["quality"] = 90
    if kind.family == "JPEG":
        options["progressive"] = kind.progressive
    buf = io.BytesIO()
    img.save(buf, kind.family, **options)
    data = buf.getvalue()
    return data[: int(len(data) * _CUT_AT)] if kind.cut else data


# --------------------------------------------------------------------------------- the rule


def settle(
    path: str,
    error: BaseException,
    data,
    attempt: Callable[[bytes], str | None],
    max_short: int,
    repairs: bool = True,
) -> None:
    """``error`` ended ``path`` (what was being done, and with which settings) on the image ``data``.
    Returns when the image is at fault: ``attempt`` (the same path, on other bytes; returns None
    when they pass, else why not, or raises) passes the control of the image's kind. Raises
    MachineryFault when the control fails too. MemoryError propagates (memory is no property of
    an image, nor a verdict on the machinery). ``repairs=False``: the path does not repair data
    cut short (a cut image fails it by design: the perceptual hash), so its control is never cut."""
    kind = control_for(data, max_short)
    if not repairs:
        kind = kind._replace(cut=False)
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
