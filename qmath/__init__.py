"""qmath: GRPO for small instruct LLMs on grade-school math, on Lightning."""

from qmath.data import GSM8K
from qmath.module import GRPO

__all__ = ["GRPO", "GSM8K"]
__version__ = "0.1.0"
