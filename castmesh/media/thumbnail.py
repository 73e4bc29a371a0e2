"""A JPEG of one keyframe: a fresh decoder for the keyframe alone (its codec configuration as extradata),
the picture scaled to at most MAX_WIDTH wide with its aspect ratio, encoded as a baseline JPEG. PyAV
(FFmpeg's decoders and its mjpeg encoder): measured at ~5 ms of CPU for a 720p keyframe, against ~27 ms for
an ffmpeg child per picture (docs/ARCHITECTURE.md, "Media workers"). The codec work lets go of the GIL;
callers run it off the event loop.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, cast

from castmesh.media.codecs import CodecError, VideoConfig, VideoSample, read_video

MAX_WIDTH = 640
DECODERS = {"avc1": "h264", "hvc1": "hevc", "av01": "libdav1d", "vp09": "vp9"}


if TYPE_CHECKING:
    from av.video.codeccontext import VideoCodecContext


class ThumbnailError(ValueError):
    """The keyframe could not be made a picture (a codec this build lacks, undecodable data)."""


def thumbnail(config_payload: bytes, keyframe_payload: bytes, max_width: int = MAX_WIDTH) -> tuple[bytes, int, int]:
    """JPEG bytes and their size from FLV video tag bodies: a sequence header and a keyframe."""
    import av  # loaded with the first thumbnail: nodes that make none never load FFmpeg's libraries
    import av.error
    try:
        config, sample = read_video(config_payload), read_video(keyframe_payload)
    except CodecError as exc:
        raise ThumbnailError(str(exc)) from None
    if not isinstance(config, VideoConfig) or not isinstance(sample, VideoSample) or not sample.keyframe:
        raise ThumbnailError("not a codec configuration and a keyframe")
    name = DECODERS.get(config.codec)
    if name is None:
        raise ThumbnailError(f"no decoder for {config.codec}")
    try:
        decoder = cast("VideoCodecContext", av.CodecContext.create(name, "r"))
        decoder.extradata = config.record
        frames = decoder.decode(av.Packet(sample.data)) + decoder.decode(None)
    except (av.error.FFmpegError, ValueError) as exc:
        raise ThumbnailError(f"the keyframe did not decode: {exc}") from None
    if not frames:
        raise ThumbnailError("the keyframe decoded to no picture")
    picture = frames[0]
    width = max(2, min(max_width, picture.width) // 2 * 2)
    height = max(2, round(picture.height * width / picture.width / 2) * 2)
    encoder = cast("VideoCodecContext", av.CodecContext.create("mjpeg", "w"))
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuvj420p"
    encoder.time_base = Fraction(1, 25)
    try:
        scaled = picture.reformat(width, height, "yuvj420p")
        data = b"".join(bytes(p) for p in encoder.encode(scaled) + encoder.encode(None))
    except (av.error.FFmpegError, ValueError) as exc:
        raise ThumbnailError(f"JPEG encoding failed: {exc}") from None
    return data, width, height
