"""Lanes: several LoRAs that differ only in learning rate, trained in one batched forward. The
training loop (loop.py) always trains lanes; one LoRA is the one-lane case.

A small model is overhead-bound: on the mini model one training step at batch 1 costs 37 ms and
at batch 5 95 ms (19 ms per sample, 2 cores AVX-512). Lanes turn that into speed: the frozen base
runs once on the batch repeated per lane, (lanes x B, ...), and each adapted layer adds lane l's
own update B_l A_l x to lane l's rows. Each lane has its own LoRA parameters, its own AdamW
parameter group (its own lr) and its own gradient clipping; the lanes draw the same batches
(same seed), so lane l sees exactly what a lone training at its lr would.

Nothing mixes across the batch in the Flux2 transformer (attention, norms and modulation are per
sample), so a lane's gradient is its own loss's alone (tests/test_lanes.py checks lanes against
one-lane trainings). One lane trains the model's own peft adapter through peft's forward; several
keep their weights here, and inside `batched` each adapted layer is of a lane subclass of its
peft class whose forward reads the lanes' weights from the layer. A class, not a per-layer
bound forward: torch.compile guards on the layer's type, which is the same for every layer and
step, where a bound forward per layer and step was a new object each time and recompiled every
block (train.compile with lanes).

Several lanes' weights live stacked, one (lanes, *shape) tensor per adapter tensor, so a layer's
forward reads all lanes without stacking them (a stack per tensor and forward, and its backward,
cost 4-9% of a lanes-of-3 step on the mini model). Lane l's parameters, the ones its optimizer
group, clipping and saved state see, are row-l views of that storage, and so are their gradients:
the backward accumulates into the stacked gradient in place.

At a checkpoint lane l's weights are copied into the model's ordinary peft adapter and the
callback sees a plain single-LoRA model: evaluation, saving and snapshots need no lane logic.
A saved training state is one lane's, in the one-lane layout; trainings that continue from the
same step with the same data order (their samplers' states equal) continue together as lanes.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from klein_sweep.training.batches import Batch, flow_matching_prediction
from klein_sweep.training.resume import TrainState, lora_names


class LaneAdapters:
    """Per-lane LoRA weights for the peft adapter "default" already injected into `transformer`
    (every lane starts from the same, seeded initialisation). One lane: the adapter's own."""

    def __init__(self, transformer: torch.nn.Module, n_lanes: int):
        from peft.tuners.lora import LoraLayer

        self.transformer = transformer
        self.layers = [m for m in transformer.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]
        # The adapter's own parameters, A then B per layer, in model order.
        self.adapter = [p for m in self.layers for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
        self.n_lanes = n_lanes
        self.single = n_lanes == 1
        if self.single:
            self.stacked: list[torch.Tensor] = []
            self.params = [self.adapter]
        else:
            # (lanes, *shape) per adapter tensor, with its gradient allocated once: autograd adds
            # into it in place, so the row views below stay the lanes' gradients.
            self.stacked = [p.detach().float().unsqueeze(0).repeat(n_lanes, *([1] * p.ndim)).requires_grad_() for p in self.adapter]
            for s in self.stacked:
                s.grad = torch.zeros_like(s)
            self.params = [[self._row(s, lane) for s in self.stacked] for lane in range(n_lanes)]

    @staticmethod
    def _row(stacked: torch.Tensor, lane: int) -> torch.nn.Parameter:
        """Row `lane` of `stacked` as a parameter of its own sharing its storage, with its
        gradient the same row of the stacked gradient."""
        p = torch.nn.Parameter(stacked.detach()[lane])
        p.grad = stacked.grad[lane]
        return p

    def keep_grads_of(self, active: Sequence[int]) -> None:
        """Before an optimizer step: a lane out of the batch carries no gradient into it, so AdamW
        leaves its weights as they were when it left (no weight decay, no momentum)."""
        if not self.single:
            for lane in set(range(self.n_lanes)) - set(active):
                for p in self.params[lane]:
                    p.grad = None

    def zero_grad(self, optimizer) -> None:
        """After an optimizer step. Several lanes: their gradients zeroed in place, so the row
        views stay attached."""
        if self.single:
            optimizer.zero_grad(set_to_none=True)
        else:
            torch._foreach_zero_([s.grad for s in self.stacked])

    @contextlib.contextmanager
    def batched(self, lanes: Sequence[int]):
        """Inside the block the adapted layers run `lanes` side by side on a (len(lanes) x B, ...)
        batch whose lane blocks are contiguous: rows [i*B, (i+1)*B) belong to lanes[i]."""
        if self.single:
            yield  # peft's own forward on the adapter's own weights
            return
        rows = None if list(lanes) == list(range(self.n_lanes)) else torch.tensor(list(lanes), device=self.stacked[0].device)
        classes: dict[int, type] = {}  # layer index -> its peft class, while it runs as lanes
        hooked = {}  # a hook's own wrapper (an instance `forward`) would hide the class's: set aside meanwhile
        try:
            for i, m in enumerate(self.layers):
                a, b = self.stacked[2 * i], self.stacked[2 * i + 1]
                if rows is not None:  # some lanes left the batch: the others' rows
                    a, b = a.index_select(0, rows), b.index_select(0, rows)
                if "forward" in m.__dict__:
                    hooked[i] = m.__dict__.pop("forward")
                m.lane_a, m.lane_b = a, b
                classes[i] = type(m)
                m.__class__ = _lane_class(classes[i])
            yield
        finally:
            for i, m in enumerate(self.layers):
                if i in classes:
                    m.__class__ = classes[i]
                    del m.lane_a, m.lane_b
                if i in hooked:
                    m.forward = hooked[i]

    @torch.no_grad()
    def load(self, lane: int) -> None:
        """Copy lane `lane`'s weights into the model's ordinary adapter."""
        if not self.single:
            for p, q in zip(self.adapter, self.params[lane]):
                p.copy_(q)

    def state_of(self, lane: int) -> dict[str, torch.Tensor]:
        """Lane `lane`'s weights under the adapter's parameter names (TrainState.lora)."""
        names = lora_names(self.transformer, self.adapter)
        return {n: q.detach().cpu().clone() for n, q in zip(names, self.params[lane])}

    @torch.no_grad()
    def restore(self, lane: int, state: TrainState) -> None:
        """A saved training's weights into lane `lane`; the names must match one to one (same
        rank, targets and model), or the state belongs to another training."""
        names = lora_names(self.transformer, self.adapter)
        if sorted(names) != sorted(state.lora):
            missing = sorted(set(names) ^ set(state.lora))[:3]
            raise ValueError(f"saved training state does not fit this LoRA (differs in {missing} ...): other rank, targets or model")
        for name, p in zip(names, self.params[lane]):
            p.copy_(state.lora[name].to(p.device, p.dtype))


_LANE_CLASSES: dict[type, type] = {}


def _lane_class(peft_class: type) -> type:
    """The lane subclass of a peft layer class (one per class, so compiled code sees one type)."""
    if peft_class not in _LANE_CLASSES:
        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return _lane_forward(self, self.lane_a, self.lane_b, x, *args, **kwargs)

        _LANE_CLASSES[peft_class] = type(f"Lanes{peft_class.__name__}", (peft_class,), {"forward": forward})
    return _LANE_CLASSES[peft_class]


def _lane_forward(layer, a_stack: torch.Tensor, b_stack: torch.Tensor, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) + per-lane B_l (A_l x) * scale, with a_stack (lanes, r, in) and b_stack (lanes,
    out, r). x (lanes x B, ..., in) -> (lanes x B, ..., out)."""
    result = layer.base_layer(x, *args, **kwargs)
    lanes = a_stack.shape[0]
    xs = x.to(a_stack.dtype).reshape(lanes, -1, x.shape[-1])  # (lanes, B*tokens, in)
    down = torch.bmm(xs, a_stack.transpose(1, 2))  # (lanes, B*tokens, r)
    # result + scale * down @ B^T in one kernel: the scale and the sum ride in the matrix product,
    # where a separate mul and add each passed over the whole (lanes, B*tokens, out) output and
    # back again in the backward (memory-bound on a CPU: ~0.5 ms each for the mini's widest layer).
    base = result.reshape(lanes, -1, result.shape[-1]).to(a_stack.dtype)
    out = torch.baddbmm(base, down, b_stack.transpose(1, 2), alpha=layer.scaling["default"])
    return out.reshape(result.shape).to(result.dtype)


def lane_losses(transformer: torch.nn.Module, batch: Batch, device: str, n_lanes: int) -> torch.Tensor:
    """(n_lanes,) flow-matching losses: the batch repeated once per lane, one forward."""
    repeated = Batch(*(t.repeat(n_lanes, *([1] * (t.ndim - 1))) for t in
                       (batch.latents, batch.prompt_embeds, batch.noise, batch.sigmas)))
    pred, target = flow_matching_prediction(transformer, repeated, device)
    return ((pred.float() - target.float()) ** 2).reshape(n_lanes, -1).mean(dim=1)


# --- saved states: one lane's in the one-lane layout, merged again to continue as lanes ---------

PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas")  # the lr schedulers' per-parameter-group entries


def lane_train_state(adapters: LaneAdapters, lane: int, step: int, optimizer, lr_scheduler, sampler: dict) -> TrainState:
    """Lane `lane`'s training state in the one-lane layout (one parameter group)."""
    full = optimizer.state_dict()
    group = full["param_groups"][lane]
    index = {old: new for new, old in enumerate(group["params"])}
    opt_state = {
        "state": {index[k]: v for k, v in full["state"].items() if k in index},
        "param_groups": [{**group, "params": list(range(len(index)))}],
    }
    sched = lr_scheduler.state_dict()
    sched_state = {k: ([v[lane]] if k in PER_GROUP and isinstance(v, list) else v) for k, v in sched.items()}
    return TrainState(step=step, lora=adapters.state_of(lane), optimizer=opt_state, scheduler=sched_state, sampler=sampler)


def resume_lanes(adapters: LaneAdapters, states: Sequence[TrainState | None], optimizer, lr_scheduler) -> tuple[int, dict | None]:
    """Every lane's saved state into the lanes, the optimizer's groups and the schedule. Returns
    (the step they continue from, the data sampler's state), or (0, None) with nothing to resume.
    Lanes continue together only from one step and one data order."""
    if all(s is None for s in states):
        return 0, None
    if any(s is None for s in states) or len({s.step for s in states}) != 1 or not all(
            _same_sampler(s.sampler, states[0].sampler) for s in states[1:]):
        raise ValueError("lanes continue together only from saved states at one step with one data order")
    for lane, state in enumerate(states):
        adapters.restore(lane, state)
    merged = optimizer.state_dict()
    merged["state"] = {}
    for lane, state in enumerate(states):
        ids = merged["param_groups"][lane]["params"]
        saved = state.optimizer
        merged["state"].update({ids[k]: v for k, v in saved["state"].items()})
        merged["param_groups"][lane] = {**saved["param_groups"][0], "params": ids}
    optimizer.load_state_dict(merged)
    schedule = dict(states[0].scheduler)
    for key in PER_GROUP:
        if isinstance(schedule.get(key), list):
            schedule[key] = [s.scheduler[key][0] for s in states]
    lr_scheduler.load_state_dict(schedule)
    return states[0].step, states[0].sampler


def _same_sampler(a: dict, b: dict) -> bool:
    return torch.equal(a["generator"], b["generator"]) and list(a["order"]) == list(b["order"])
