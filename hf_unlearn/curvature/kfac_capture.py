"""K-FAC factors from a training loop's own forward/backward passes (no extra pass over the data).

The HF Trainer differentiates `loss = c · Σ_b S_b` (the causal-LM cross entropy of the micro-batch, scaled by
`1/num_items_in_batch`, gradient accumulation, the number of processes, a mixed-precision loss scale, ...),
while the factors need `g = ∂ℓ(z_b)/∂s` (`ℓ = S` under "token", `S/T` under "example"). Rather than re-deriving
the Trainer's scaling, `TrainingCapture` measures it: a hook on the logits receives `∂loss/∂logits`, which for
cross entropy is `c_b (p − e_y)` at example b's loss positions and 0 elsewhere, so

    c_b = ⟨∂loss/∂logits_b, r_b⟩ / ⟨r_b, r_b⟩,   r_b = softmax(logits_b) − onehot(labels_b)   (loss positions),

and the output gradients of example b are multiplied by `w_b = 1/c_b` (`1/(c_b T_b)` under "example") before
they enter G. A model whose forward never materialises the logits (TRL's `SFTTrainer` patches in a fused LM
head, `fused_lm_head=True`, that returns the per-token `log_probs` of the labels instead) is measured at those:
`∂loss/∂log_probs_{b,t} = −c_b` at every loss position of example b. The fit's relative residual is checked on every micro-batch: a loss that is not the plain
token cross entropy of the labels the model received (label smoothing, a custom `compute_loss_func`, extra
loss terms) is detected and the capture is marked invalid instead of producing wrong factors.

What is captured is what training computes: the model in train mode (with LoRA dropout `p`, the input of
`lora_A` is the dropped-out input, so its factor carries the dropout noise: in expectation its diagonal is
`1/(1 − p)` times larger), and θ moving along the last epoch's steps rather than fixed at θ*. The
factors' `info` records both (`train_mode_dropout`, `steps`). Targets are the data's labels ("empirical").
"""

from __future__ import annotations

import time

import torch

from ..data import IGNORE_INDEX
from ..errors import ConfigurationError
from ..params import ParameterSpace
from .kfac import KFACFactors, linear_blocks, parameters_digest
from .kfac_fit import FactorCollector, _zeros_for, accumulation_dtype

SCALE_TOLERANCE = 1e-2  # relative residual of ∂loss/∂logits ≈ c_b (p − e_y), per micro-batch


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    for candidate in (model, getattr(model, "get_base_model", lambda: None)()):
        get = getattr(candidate, "get_output_embeddings", None)
        module = get() if callable(get) else None
        if isinstance(module, torch.nn.Module):
            return module
    raise ConfigurationError(
        "Curvature capture during training needs the model's logits: the model has no "
        "get_output_embeddings() (a causal LM head). Compute the factors with one pass instead "
        "(curvature_factors='pass')."
    )


class TrainingCapture:
    """Hooks on a (unwrapped) causal LM that accumulate K-FAC factors while something else trains it.

    `start()` registers the hooks, `stop()` removes them, `factors(processes)` sums over processes and
    returns `KFACFactors` (source "training"). Forwards without gradient (evaluation) are ignored.
    """

    def __init__(self, model: torch.nn.Module, normalization: str = "token"):
        self.model, self.normalization = model, normalization
        self.space = ParameterSpace(model)
        self.blocks, self.uncovered = linear_blocks(model, self.space)
        if not self.blocks:
            raise ConfigurationError("Curvature capture: the model has no trainable nn.Linear layer.")
        self.head = _output_embeddings(model)
        self.collector = FactorCollector(self.blocks)
        self.collector.require_weights = True
        self.collector.active = False
        self.num_rows, self.normaliser, self.micro_batches = 0, 0.0, 0
        self.problems: list[str] = []  # the first few reasons the capture is invalid
        self.num_problems = 0
        self.dropout = self._dropout_probabilities()
        self.seconds = 0.0
        self._labels = None
        self._handles = []

    def _dropout_probabilities(self) -> float:
        ps = [
            m.p
            for name, m in self.model.named_modules()
            if isinstance(m, torch.nn.Dropout) and "lora" in name
        ]
        return max(ps, default=0.0)

    def _problem(self, message: str) -> None:
        self.num_problems += 1
        if len(self.problems) < 3:
            self.problems.append(message)

    # --- hooks ---

    def start(self) -> None:
        if self._handles:
            return
        self.collector.__enter__()
        self.collector.active = True
        self._handles = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.head.register_forward_hook(self._after_head),
            self.model.register_forward_hook(self._after_fused_head),
        ]

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.collector.active = False
        self.collector.__exit__()

    @property
    def running(self) -> bool:
        return bool(self._handles)

    def _before_forward(self, module, args, kwargs):
        if not torch.is_grad_enabled():
            self._labels = None
            return
        labels, mask = kwargs.get("labels"), kwargs.get("attention_mask")
        if labels is None:
            self._labels = None
            self.collector.set_mask(None)  # a fresh batch without weights: its gradients are not used
            self._problem(
                "a training forward got no `labels` (the loss was computed outside the model, e.g. label "
                "smoothing or compute_loss_func), so its output gradients cannot be rescaled to ∂ℓ/∂s"
            )
            return
        self._labels = labels
        self.collector.set_mask(mask)

    def _after_head(self, module, inputs, logits):
        if self._labels is None or not (torch.is_grad_enabled() and logits.requires_grad):
            return
        labels, batch, values = self._labels, self.collector.batch, logits.detach()  # no reference cycle
        logits.register_hook(lambda grad: self._rescale(values, grad.detach(), labels, batch))

    def _after_fused_head(self, module, inputs, output):
        """A fused LM head (TRL's `fused_lm_head=True`): no logits, the labels' per-token log-probabilities."""
        log_probs = getattr(output, "log_probs", None)
        if self._labels is None or getattr(output, "logits", None) is not None or log_probs is None:
            return
        if not (torch.is_grad_enabled() and log_probs.requires_grad):
            return
        if tuple(log_probs.shape) != (self._labels.shape[0], self._labels.shape[1] - 1):
            self._problem(
                f"the fused LM head returned log_probs of shape {tuple(log_probs.shape)} for labels of shape "
                f"{tuple(self._labels.shape)} (shifted or packed labels?)"
            )
            return
        labels, batch = self._labels, self.collector.batch
        log_probs.register_hook(lambda grad: self._rescale_log_probs(grad.detach(), labels, batch))

    def _rescale_log_probs(self, grad: torch.Tensor, labels: torch.Tensor, batch) -> None:
        """`w_b` from `∂loss/∂log_probs`, which for the token cross entropy `S_b = −Σ_t log_probs_{b,t}` is
        `−c_b` at each loss position of example b."""
        start = time.perf_counter()
        loss_at = labels[:, 1:] != IGNORE_INDEX  # (B, L-1)
        dtype = accumulation_dtype(grad.dtype)
        g = -grad.to(dtype) * loss_at  # ∂loss/∂S_b at each loss position, 0 elsewhere
        counts = loss_at.sum(1).to(dtype)  # T_b
        c = g.sum(1) / counts.clamp_min(1)  # the mean over the loss positions
        total = g.pow(2).sum()
        explained = (c * c * counts).sum()
        residual = ((total - explained).clamp_min(0) / total.clamp_min(torch.finfo(total.dtype).tiny)).sqrt()
        self._set_weights(
            c, counts, residual.item(), batch, "the loss gradient at the labels' log-probabilities"
        )
        self.seconds += time.perf_counter() - start

    def _rescale(self, logits: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, batch) -> None:
        """Set the per-example weights `w_b` from `∂loss/∂logits` (module docstring)."""
        start = time.perf_counter()
        B = logits.shape[0]
        targets = labels[:, 1:]  # (B, L-1): token t+1 is predicted at position t
        loss_at = targets != IGNORE_INDEX  # (B, L-1)
        example = loss_at.nonzero()[:, 0]  # (n,) example of each loss position
        dtype = accumulation_dtype(logits.dtype)
        z = logits[:, :-1][loss_at].to(dtype)  # (n, V)
        r = torch.softmax(z, dim=-1)
        r[torch.arange(len(r), device=r.device), targets[loss_at]] -= 1.0  # p − e_y  (n, V)
        g = grad[:, :-1][loss_at].to(dtype)  # (n, V)
        num = torch.zeros(B, dtype=dtype, device=r.device).index_add_(
            0, example, (g * r).sum(-1)
        )  # ⟨g_b, r_b⟩
        den = torch.zeros(B, dtype=dtype, device=r.device).index_add_(
            0, example, (r * r).sum(-1)
        )  # ⟨r_b, r_b⟩
        c = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
        total = grad.to(dtype).pow(2).sum()
        explained = torch.where(den > 0, num * num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0).sum()
        residual = ((total - explained).clamp_min(0) / total.clamp_min(torch.finfo(total.dtype).tiny)).sqrt()
        counts = loss_at.sum(1).to(c.dtype)  # T_b
        self._set_weights(c, counts, residual.item(), batch, "the loss gradient at the logits")
        self.seconds += time.perf_counter() - start

    def _set_weights(self, c: torch.Tensor, counts: torch.Tensor, residual: float, batch, where: str) -> None:
        """`w_b` from the measured scales `c_b` of a micro-batch of examples with `counts` loss tokens; a fit
        whose relative `residual` exceeds `SCALE_TOLERANCE` marks the capture invalid."""
        if residual > SCALE_TOLERANCE:
            self._problem(
                f"{where} is not a multiple of the cross-entropy gradient of the labels "
                f"(relative residual {residual:.2g} > {SCALE_TOLERANCE:g}): the training loss is not the "
                "token cross entropy (label smoothing, a custom loss, extra terms?)"
            )
        w = torch.where(c != 0, 1.0 / torch.where(c != 0, c, torch.ones_like(c)), torch.zeros_like(c))
        if self.normalization == "example":
            w = w / counts.clamp_min(1)
        batch.example_weights = w
        self.num_rows += len(c)
        self.normaliser += float(counts.sum()) if self.normalization == "token" else float(len(c))
        self.micro_batches += 1

    # --- result ---

    def factors(self, processes, **info) -> KFACFactors:
        """The captured factors, summed over processes; raises if nothing valid was captured."""
        if self.running:
            self.stop()
        if self.collector.problem:
            self._problem(self.collector.problem)
            self.collector.problem = None
        counts = [self.num_rows, self.normaliser, self.num_problems, self.micro_batches]
        counts = processes.sum(torch.tensor(counts, dtype=torch.float64)).tolist()
        num_rows, M, problems, micro_batches = int(counts[0]), counts[1], int(counts[2]), int(counts[3])
        if problems:
            raise ConfigurationError(
                "The curvature captured during training is not valid: "
                + (self.problems[0] if self.problems else f"{problems} problems on other processes")
                + ". Compute the factors with one pass at the trained weights instead (curvature_factors='pass')."
            )
        if num_rows == 0:
            raise ConfigurationError(
                "No training step ran while curvature capture was active (training stopped early?), so there "
                "are no factors. Compute them with one pass instead (curvature_factors='pass')."
            )
        p = self.space.params[0]
        _zeros_for(self.blocks, self.collector, accumulation_dtype(p.dtype), p.device)
        self.collector.summed(processes)
        return KFACFactors(
            self.collector.A, self.collector.G, self.collector.positions,
            normalization=self.normalization, normaliser=M, num_rows=num_rows, targets="empirical",
            source="training", micro_batches=micro_batches, train_mode_dropout=self.dropout,
            parameters_digest=parameters_digest(self.space), **info,
        )  # fmt: skip
