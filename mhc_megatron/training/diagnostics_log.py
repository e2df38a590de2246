"""``--mhc-log-interval N``: H_res statistics and Amax gains in Megatron's TensorBoard / W&B logs.

Every N iterations the coefficient modules record ``H_res`` of a fixed token subset during the
step's first forward pass (hooks on the modules, attached through the model config's
``post_wrap_hooks``). Megatron's ``training_log`` is wrapped (hook ``diagnostics-log``): after it has run (on every rank,
outside the pipeline schedule, so a collective there cannot deadlock), the pipeline ranks gather
their layers' matrices and the rank that owns the writers logs

- ``mhc/composite_forward_gain``, ``mhc/composite_backward_gain``: Amax gains of the product of
  all layers' H_res (docs/maths.md, "Stability diagnostics"), averaged over the recorded tokens;
- ``mhc/max_single_forward_gain``, ``mhc/max_single_backward_gain``;
- per sublayer ``mhc/sublayer_<i>/{forward_gain,backward_gain,diag_mean,min,max,col_sum_err}``
  (``col_sum_err``: max |column sum - 1|, how far Sinkhorn is from doubly stochastic).

With mhc, a ``col_sum_err`` above ``COL_SUM_WARN`` is also printed in the training log, once each
time a sublayer crosses it: large H_res logits leave t_max Sinkhorn iterations short of doubly
stochastic, and the layer's gain then exceeds 1 without any other sign.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import ops
from ..mcore.coefficients import HCCoefficients, MHCCoefficients

TOKENS = 256  # tokens of the first micro-batch whose H_res are recorded
COL_SUM_WARN = 0.1  # max |column sum - 1| that is warned about (converged Sinkhorn: < 1e-3)


class MHCDiagnosticsLog:
    def __init__(self, interval: int, *, iteration_fn=None, writers_fn=None, pp_group_fn=None, tokens: int = TOKENS,
                 warn_fn=None, col_sum_warn: float = COL_SUM_WARN):
        if interval < 1:
            raise ValueError(f"--mhc-log-interval must be >= 1, got {interval}")
        self.interval = interval
        self.tokens = tokens
        self._iteration = iteration_fn or _megatron_iteration
        self._writers = writers_fn or _megatron_writers
        self._pp_group = pp_group_fn or _megatron_pp_group
        self._warn = warn_fn or _print_on_last_rank
        self.col_sum_warn = col_sum_warn
        self.sinkhorn = False  # the model's H_res are Sinkhorn's (mhc), not HC's unconstrained ones
        self._off: set[int] = set()  # sublayers above col_sum_warn at the last flush
        self.recorded: dict[int, torch.Tensor] = {}
        self.last: dict | None = None

    # -- recording ------------------------------------------------------------------------------

    def attach(self, model_chunks):
        """``post_wrap_hooks`` entry: hook every coefficient module of the chunks."""
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, (MHCCoefficients, HCCoefficients)):
                    module.register_forward_hook(self._record)
                    self.sinkhorn |= isinstance(module, MHCCoefficients)
        return model_chunks

    def _record(self, module, inputs, output) -> None:
        # Megatron's curr_iteration k is logged as iteration k + 1
        if (self._iteration() + 1) % self.interval or module.sublayer_index in self.recorded:
            return
        h_res = output[2].detach()
        self.recorded[module.sublayer_index] = h_res.reshape(-1, *h_res.shape[-2:])[: self.tokens].float().cpu()

    # -- logging --------------------------------------------------------------------------------

    def wrap_training_log(self, training_log):
        def training_log_with_mhc(*args, **kwargs):
            result = training_log(*args, **kwargs)
            iteration = kwargs["iteration"] if "iteration" in kwargs else args[3]
            if iteration % self.interval == 0:
                self.flush(iteration)
            return result

        return training_log_with_mhc

    def flush(self, iteration: int) -> dict | None:
        """Gather this step's recordings over the pipeline and write them; returns the scalars."""
        layers = dict(self.recorded)
        self.recorded.clear()
        group = self._pp_group()
        if group is not None and group.size() > 1:
            parts = [None] * group.size()
            dist.all_gather_object(parts, layers, group=group)
            layers = {k: v for part in parts for k, v in part.items()}
        if not layers:
            return None
        scalars = self.scalars(layers)
        self.last = scalars
        if self.sinkhorn:
            self._warn_col_sums(scalars, iteration)
        tensorboard, wandb = self._writers()
        if tensorboard is not None:
            for name, value in scalars.items():
                tensorboard.add_scalar(name, value, iteration)
        if wandb is not None:
            wandb.log(scalars, iteration)
        return scalars

    def _warn_col_sums(self, scalars: dict[str, float], iteration: int) -> None:
        """Warn once per crossing of ``col_sum_warn``, per sublayer."""
        for key, err in scalars.items():
            if not key.endswith("/col_sum_err"):
                continue
            index = int(key.split("/")[1].removeprefix("sublayer_"))
            if err <= self.col_sum_warn:
                self._off.discard(index)
            elif index not in self._off:
                self._off.add(index)
                gain = scalars[f"mhc/sublayer_{index}/backward_gain"]
                self._warn(
                    f"mhc-pretrain-gpt: WARNING: iteration {iteration}: H_res of mHC sublayer {index} is {err:.3g} "
                    f"from doubly stochastic (max |column sum - 1| > {self.col_sum_warn}; its backward gain is "
                    f"{gain:.3g}, not 1): the H_res logits are too large for the Sinkhorn iterations; raise "
                    "--mhc-sinkhorn-iters (or lower the learning rate)"
                )

    @staticmethod
    def scalars(layers: dict[int, torch.Tensor]) -> dict[str, float]:
        order = sorted(layers)
        profile = ops.gain_profile([layers[i] for i in order])
        out = {
            "mhc/composite_forward_gain": profile["composite_forward_gain"],
            "mhc/composite_backward_gain": profile["composite_backward_gain"],
            "mhc/max_single_forward_gain": profile["max_single_forward_gain"],
            "mhc/max_single_backward_gain": profile["max_single_backward_gain"],
        }
        for pos, index in enumerate(order):
            m = layers[index]
            prefix = f"mhc/sublayer_{index}/"
            out[prefix + "forward_gain"] = profile["single_forward_gain"][pos]
            out[prefix + "backward_gain"] = profile["single_backward_gain"][pos]
            out[prefix + "diag_mean"] = float(m.diagonal(dim1=-2, dim2=-1).mean())
            out[prefix + "min"] = float(m.min())
            out[prefix + "max"] = float(m.max())
            out[prefix + "col_sum_err"] = float((m.sum(-2) - 1).abs().max())
        return out


def attach_diagnostics_log(interval: int, model_cfg) -> MHCDiagnosticsLog:
    """Attach the logger to the models ``model_cfg`` builds (its ``post_wrap_hooks``) and install
    hook ``diagnostics-log`` around Megatron's ``training_log``."""
    from .. import hooks

    log = MHCDiagnosticsLog(interval)
    model_cfg.post_wrap_hooks = [*model_cfg.post_wrap_hooks, log.attach]
    hooks.uninstall("diagnostics-log")  # a logger of an earlier launch in this process
    hooks.install("diagnostics-log", log)
    return log


def _print_on_last_rank(message: str) -> None:
    """Megatron's training log is printed by the last rank."""
    if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
        print(message, flush=True)


def _megatron_iteration() -> int:
    from megatron.training import get_args

    return getattr(get_args(), "curr_iteration", 0)


def _megatron_writers():
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

    return get_tensorboard_writer(), get_wandb_writer()


def _megatron_pp_group():
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group() if dist.is_initialized() else None
