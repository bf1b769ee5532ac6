"""Decode images (PIL) and videos (PyAV) into bucket-sized uint8 frames.

Every failure becomes ``SkipSample(reason, detail)`` -- the preprocessing loop counts and
reports it and goes on; nothing here may end the run on a bad file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megassm.data.buckets import ResolutionBuckets, cover_crop_box

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
VIDEO_EXTS = {"mp4", "webm", "mkv", "avi", "mov", "m4v"}

SKIP_REASONS = {
    "unreadable": "the file could not be opened or read",
    "corrupt_image": "PIL could not decode the image",
    "truncated_image": "the image file ends early",
    "corrupt_video": "PyAV could not open or decode the video",
    "no_video_stream": "the container has no video stream",
    "too_short": "the video has fewer frames than --frames at --fps",
    "too_small": "the shorter side is below --min-side",
    "missing_caption": "no caption (sidecar file, manifest row or tar member)",
    "empty_caption": "the caption is empty",
    "video_needs_video_vae": "a video was given but the VAE encodes images only",
    "unsupported_media": "a tar sample without an image or video member",
    "corrupt_input_tar": "an input tar shard could not be read to its end",
    "encode_failed": "the VAE or text encoder raised on this sample",
    "nonfinite_latent": "the VAE produced NaN/Inf",
    "decoder_crashed": "the decoder process died on this file (segfault, abort, out of memory)",
    "decode_timeout": "decoding did not finish within --decode-timeout seconds (the decoder hung)",
}


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Frames:
    """Decoded, bucketed pixels: uint8 (T, 3, H, W), plus what the source was."""

    pixels: torch.Tensor
    src_height: int
    src_width: int
    src_frames: int
    fps: float | None


def _open(src: str | bytes):
    return io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb")


def _resize_crop(x: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, bh, bw): cover-resize (bicubic, antialiased) + centre crop."""
    _, _, h, w = x.shape
    rh, rw, top, left, _, _ = cover_crop_box(h, w, bh, bw)
    if (rh, rw) != (h, w):
        y = F.interpolate(x.float(), size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    return x[:, :, top:top + bh, left:left + bw].contiguous()


def load_image(src: str | bytes, buckets: ResolutionBuckets, min_side: int = 0) -> Frames:
    """Image file (path or bytes) -> Frames with T = 1 in its nearest bucket."""
    from PIL import Image, ImageOps

    try:
        f = _open(src)
    except OSError as e:
        raise SkipSample("unreadable", str(e)) from None
    try:
        with f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":  # RGBA / LA / P: composite on white so transparency is not black
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img).convert("RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except OSError as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise SkipSample(reason, str(e) or type(e).__name__) from None
    except Exception as e:  # PIL raises many types (SyntaxError, ValueError, DecompressionBomb...)
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    h, w = arr.shape[:2]
    if min(h, w) < min_side:
        raise SkipSample("too_small", f"{w}x{h} < --min-side {min_side}")
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
    bh, bw = buckets.nearest(h, w)
    return Frames(_resize_crop(x, bh, bw), h, w, 1, None)


def load_video(src: str | bytes, buckets: ResolutionBuckets, frames: int, fps: float,
               min_side: int = 0) -> Frames:
    """Video file -> Frames with exactly ``frames`` frames resampled to ``fps``.

    Resampling picks, for each target time t0 + k / fps, the last frame shown at or before
    it (frames repeat when the source fps is lower, are dropped when higher). A video that
    does not cover (frames - 1) / fps seconds is skipped as too_short.
    """
    import av

    try:
        f = _open(src)
    except OSError as e:
        raise SkipSample("unreadable", str(e)) from None
    picked: list = []
    try:
        with f, av.open(f) as container:
            if not container.streams.video:
                raise SkipSample("no_video_stream", "container has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            src_fps = float(rate) if rate else None
            n_src, prev, t0 = 0, None, None
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else n_src / (src_fps or fps)
                t0 = t if t0 is None else t0
                while len(picked) < frames and prev is not None and t0 + len(picked) / fps < t - 1e-6:
                    picked.append(prev)
                prev = frame
                n_src += 1
                if len(picked) == frames:
                    break
            if prev is not None and len(picked) < frames:
                # the last frame is shown for one source frame period
                end = (prev.time if prev.time is not None else 0.0) + 1.0 / (src_fps or fps)
                while len(picked) < frames and t0 + len(picked) / fps < end - 1e-6:
                    picked.append(prev)
            if len(picked) < frames:
                dur = f"{n_src} frames" + (f" at {src_fps:.3g} fps" if src_fps else "")
                raise SkipSample("too_short", f"{dur}; need {frames} frames at {fps:g} fps")
            h, w = picked[0].height, picked[0].width
            if min(h, w) < min_side:
                raise SkipSample("too_small", f"{w}x{h} < --min-side {min_side}")
            bh, bw = buckets.nearest(h, w)
            rh, rw, top, left, _, _ = cover_crop_box(h, w, bh, bw)
            # swscale resizes each frame as it is converted: never holds full-size frames
            arrs = {}
            for fr in picked:
                if id(fr) not in arrs:
                    a = fr.reformat(width=rw, height=rh, format="rgb24", interpolation="BICUBIC").to_ndarray()
                    arrs[id(fr)] = a[top:top + bh, left:left + bw]
            x = torch.from_numpy(np.stack([arrs[id(fr)] for fr in picked])).permute(0, 3, 1, 2)
    except SkipSample:
        raise
    except OSError as e:  # av.error.* subclass OSError / ValueError
        raise SkipSample("corrupt_video", f"{type(e).__name__}: {e}") from None
    except Exception as e:
        raise SkipSample("corrupt_video", f"{type(e).__name__}: {e}") from None
    return Frames(x.contiguous(), h, w, n_src, fps)
