"""Safety and utility evaluation: suites, judges, batched generation, metrics with CIs.

The contract (DEVELOPING.md, "Evaluation"): :func:`load_suite` / :class:`SuiteItem`,
:func:`get_judge` / :class:`Verdict`, :func:`generate`, :func:`register_decoding`,
:func:`evaluate`, and :class:`safeft.eval.callback.EpochEvalCallback` for epoch-end curves.
See docs/eval.md.
"""

from .decoding import register_decoding
from .generate import generate
from .judges import Verdict, get_judge
from .runner import evaluate
from .suites import SuiteItem, load_suite

__all__ = ["SuiteItem", "Verdict", "evaluate", "generate", "get_judge", "load_suite", "register_decoding"]
