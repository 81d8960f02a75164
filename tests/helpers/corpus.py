"""The raw corpus of the shard-builder tests: every kind of input the builder takes, and every kind it rejects,
with the outcome each must have."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers.media import write_audio, write_image, write_truncated_jpeg, write_video

# The raw corpus: origin -> expected outcome ("ok", "dup" or the start of the rejection reason).
EXPECTED = {
    "animals/img_000": "ok",
    "animals/img_001": "ok",
    "animals/img_002": "ok",
    "animals/img_003": "ok",
    "animals/img_004": "ok",
    "animals/img_005": "ok",
    "modes/rgba": "ok",
    "modes/palette": "ok",
    "modes/cmyk": "ok",
    "modes/gray": "ok",
    "modes/bit16": "ok",
    "modes/exif": "ok",
    "modes/webp": "ok",
    "clips/plain": "ok",
    "clips/with_sound": "ok",
    "sounds/stereo_wav": "ok",
    "sounds/ogg": "ok",
    "sounds/flac": "ok",
    "mixed/pic_and_sound": "ok",
    "dups/copy_of_img_000": "dup",
    "broken/truncated": "undecodable image",
    "broken/empty_clip": "undecodable video",
    "broken/text_as_wav": "undecodable audio",
    "broken/no_caption": "missing caption",
    "broken/unknown": "unsupported file type",
    "cameras/_DSC0001": "ok",  # a camera's default name: read like any other
    ".DS_Store": "hidden",  # OS litter: an input, rejected unread with its reason
    ".thumbnails/img_000": "hidden",
}


def make_raw_corpus(root: Path) -> Path:
    def caption(stem: str, text: str) -> None:
        (root / f"{stem}.txt").write_text(text + "\nsecond line is ignored\n")

    for d in ("animals", "modes", "clips", "sounds", "mixed", "dups", "broken", "cameras", ".thumbnails"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(6):
        write_image(root / f"animals/img_{i:03d}.jpg", "jpg", seed=i, size=(160 + 8 * i, 120))
        caption(f"animals/img_{i:03d}", f"a gradient picture number {i}")
    for kind, name in [
        ("rgba", "rgba.png"),
        ("palette", "palette.png"),
        ("cmyk", "cmyk.jpg"),
        ("gray", "gray.png"),
        ("16bit", "bit16.png"),
        ("exif_rotated", "exif.jpg"),
        ("webp", "webp.webp"),
    ]:
        write_image(root / "modes" / name, kind, seed=7)
        caption(f"modes/{name.split('.')[0]}", f"an image stored as {kind}")
    write_video(root / "clips/plain.mp4")
    caption("clips/plain", "a test pattern video")
    write_video(root / "clips/with_sound.mp4", audio=True, pattern="smptebars")
    caption("clips/with_sound", "a fractal zoom with a tone")
    write_audio(root / "sounds/stereo_wav.wav")
    caption("sounds/stereo_wav", "a stereo tone")
    write_audio(root / "sounds/ogg.ogg", channels=1, rate=16000, freq=660)
    caption("sounds/ogg", "a vorbis tone")
    write_audio(root / "sounds/flac.flac", channels=1, rate=8000, freq=300)
    caption("sounds/flac", "a low tone")
    write_image(root / "mixed/pic_and_sound.png", "png", seed=3)
    write_audio(root / "mixed/pic_and_sound.wav", freq=880)
    caption("mixed/pic_and_sound", "a picture with a sound")
    shutil.copy(root / "animals/img_000.jpg", root / "dups/copy_of_img_000.jpg")
    caption("dups/copy_of_img_000", "the same picture with another caption")
    write_truncated_jpeg(root / "broken/truncated.jpg")
    caption("broken/truncated", "half a jpeg")
    (root / "broken/empty_clip.mp4").write_bytes(b"")
    caption("broken/empty_clip", "a zero-byte video")
    (root / "broken/text_as_wav.wav").write_text("this is not audio at all\n" * 20)
    caption("broken/text_as_wav", "text pretending to be audio")
    write_image(root / "broken/no_caption.png", "png", seed=9)
    (root / "broken/unknown.xyz").write_bytes(b"\x00\x01")
    caption("broken/unknown", "a file of unknown type")
    write_image(root / "cameras/_DSC0001.JPG", "jpg", seed=11)
    caption("cameras/_DSC0001", "a photo straight from the camera")
    (root / ".DS_Store").write_bytes(b"junk")
    write_image(root / ".thumbnails/img_000.png", "png", seed=1)
    return root
