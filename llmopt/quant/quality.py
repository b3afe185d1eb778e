"""Quality of a (quantized) model against a reference, by one fixed, documented protocol.

Protocol: the first ``max_tokens`` (16,384) tokens of the shipped public-domain slice
(``llmopt/data/persuasion_eval.txt``, the opening of Austen's *Persuasion*), tokenized without
special tokens, cut into non-overlapping windows of ``window`` (1,024) tokens; a trailing partial
window is dropped. Each window is scored independently: every position predicts the next token.
Both models compute in float32. Reported: perplexity of each model, mean KL(reference ‖ model) per
predicted token (nats), and top-1 agreement (how often both models' most likely next token agree).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from llmopt.errors import InputError

DEFAULT_MAX_TOKENS = 16_384
DEFAULT_WINDOW = 1_024
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvalSpec:
    text_path: Path | None = None  # None: the shipped evaluation slice
    max_tokens: int = DEFAULT_MAX_TOKENS
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if self.window < 2:
            raise InputError("The evaluation window must be at least 2 tokens.")
        if self.max_tokens < self.window:
            raise InputError(f"--max-tokens ({self.max_tokens}) must be at least one window ({self.window}).")


@dataclass
class QualityResult:
    text: str  # which text was scored
    tokens_scored: int  # predicted positions, over all windows
    windows: int
    perplexity: float
    reference_perplexity: float | None = None
    perplexity_increase_pct: float | None = None
    kl_mean_nats: float | None = None
    top1_agreement: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_eval_text(path: Path | None) -> tuple[str, str]:
    """(text, label) of the evaluation text: a user's file or the shipped slice."""
    if path is None:
        ref = resources.files("llmopt") / "data" / "persuasion_eval.txt"
        return ref.read_text(encoding="utf-8"), "persuasion_eval.txt (shipped)"
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError as exc:
        raise InputError(f"Text file '{path}' does not exist. Pass a UTF-8 text file with --text.") from exc
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as exc:
        raise InputError(f"Cannot read '{path}' as UTF-8 text ({exc}). Pass a UTF-8 text file.") from exc


def eval_windows(tokenizer: Any, spec: EvalSpec) -> tuple[torch.Tensor, str]:
    """The token windows of the protocol: (n_windows, window) int64, and the text's label."""
    text, label = load_eval_text(spec.text_path)
    if tokenizer is None:
        raise InputError("This model has no tokenizer (a random-weight benchmark model); quality needs text.")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: spec.max_tokens]
    n = len(ids) // spec.window
    if n == 0:
        raise InputError(
            f"'{label}' has only {len(ids)} tokens; the protocol needs at least one window of {spec.window}."
        )
    return torch.tensor(ids[: n * spec.window], dtype=torch.long).view(n, spec.window), label


@torch.no_grad()
def _window_logprobs(model: Any, window: torch.Tensor, device: torch.device) -> torch.Tensor:
    logits = model(window.unsqueeze(0).to(device)).logits[0, :-1]  # (T-1, V)
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def evaluate_quality(
    model: Any,
    tokenizer: Any,
    reference: Any | None = None,
    spec: EvalSpec | None = None,
    progress: Progress | None = None,
) -> QualityResult:
    """Score ``model`` (and ``reference``, if given) window by window; see the module docstring."""
    spec = spec or EvalSpec()
    say = progress or (lambda *_: None)
    start = time.perf_counter()
    windows, label = eval_windows(tokenizer, spec)
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device if reference is not None else device
    nll = ref_nll = kl = 0.0
    agree = 0.0
    scored = 0
    for i, window in enumerate(windows):
        targets = window[1:].unsqueeze(-1)  # (T-1, 1)
        logp = _window_logprobs(model, window, device)
        nll -= logp.gather(-1, targets).sum().item()
        if reference is not None:
            ref_logp = _window_logprobs(reference, window, ref_device)
            ref_nll -= ref_logp.gather(-1, targets).sum().item()
            kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += float((ref_logp.argmax(-1) == logp.argmax(-1)).sum().item())
        scored += targets.shape[0]
        say("evaluating", i + 1, len(windows))
    result = QualityResult(
        text=label, tokens_scored=scored, windows=len(windows), perplexity=math.exp(nll / scored)
    )
    if reference is not None:
        result.reference_perplexity = math.exp(ref_nll / scored)
        result.perplexity_increase_pct = 100.0 * (result.perplexity / result.reference_perplexity - 1.0)
        result.kl_mean_nats = kl / scored
        result.top1_agreement = agree / scored
    result.seconds = time.perf_counter() - start
    return result
