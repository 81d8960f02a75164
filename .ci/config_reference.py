"""Rewrite the README's config reference (between its config-reference markers) from `accord train --print-config`.

make config-reference
"""

import re
import sys
from pathlib import Path

from accord.config import reference
from accord.train.config import TrainConfig

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
new, count = re.subn(
    r"(<!-- config-reference[^>]*-->\n).*?(<!-- /config-reference -->)",
    lambda m: m.group(1) + reference(TrainConfig) + m.group(2),
    text,
    flags=re.S,
)
if count != 1:
    sys.exit(f"{readme}: no config-reference block")
readme.write_text(new)
