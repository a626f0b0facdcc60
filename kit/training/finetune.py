"""Fine-tuning the backbone on pixels: gradual unfreezing (``unfreeze_schedule``: which blocks
thaw at which epoch) and layer-wise learning-rate decay (``lr_decay``: AdamW parameter groups).

Blocks are :meth:`kit.models.backbones.Backbone.blocks`, counted from the end like
``unfreeze_last``. A schedule is a list of stages ``(epoch, n)``: after ``epoch`` finished
epochs the last ``n`` blocks train (``n`` an integer or ``all``). It is written as a mapping
``{0: 0, 3: 1, 6: 2, 10: all}``, a list of pairs ``[[0, 0], [3, 1]]``, the same in a string
``"0:0,3:1,6:2,10:all"``, or ``"gradual:K"`` (``"gradual:K:N"``): the head and the norm layers
alone for K epochs, then one more block every K epochs, until all blocks (or N) train.

The model is built with every block the schedule ever opens trainable (:func:`freeze_for_training`),
so the optimiser holds every parameter group, with its decayed learning rate, from the first
step; a block waiting for its epoch only has ``requires_grad`` off (:class:`ThawPlan`), so it
gets no gradient and AdamW skips it (no step, no weight decay, no moment) until it thaws. The
warm-up + cosine schedule scales every group alike.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kit.models.backbones import freeze_backbone
from kit.schema.values import SCHEDULE_SETTING, parse_schedule
from kit.utils import KitError

# --------------------------------------------------------------------------- the schedule


def schedule_opens(spec) -> bool:
    """Whether a schedule ever opens a block (then cv must train on pixels)."""
    plan = parse_schedule(spec)
    if plan is None:
        return False
    if plan[0] == "gradual":
        return True
    return any(n == "all" or n > 0 for _, n in plan[1])


def resolve_stages(spec, n_blocks: int, unfreeze_last: int = 0,
                   name: str = "this backbone") -> tuple[tuple[int, int], ...]:
    """The schedule as ``((epoch, blocks open), ...)`` for a backbone of ``n_blocks`` blocks,
    starting at epoch 0; ``unfreeze_last`` blocks are open from the start (a stage never
    opens fewer). ``()`` without a schedule."""
    plan = parse_schedule(spec)
    if plan is None:
        return ()
    if plan[0] == "gradual":
        _, every, cap = plan
        top = n_blocks if cap is None else min(cap, n_blocks)
        stages = [(i * every, i) for i in range(top + 1)]
    else:
        stages = [(e, n_blocks if n == "all" else n) for e, n in plan[1]]
        big = [n for _, n in stages if n > n_blocks]
        if big:
            raise KitError(f"{SCHEDULE_SETTING}: {name} has {n_blocks} blocks; a stage opens "
                           f"{big[0]} (use at most {n_blocks}, or all)")
    if stages[0][0] != 0:
        stages.insert(0, (0, 0))
    out = []
    for e, n in stages:
        n = max(int(n), int(unfreeze_last))
        if not out or n != out[-1][1]:
            out.append((int(e), n))
    return tuple(out)


@dataclass(frozen=True)
class ThawPlan:
    """Which backbone parameters wait for which stage.

    Attributes
    ----------
    stages : tuple of (epoch, n)
        From :func:`resolve_stages`.
    waiting : tuple of tuple of str
        ``waiting[j]``: names (in the backbone) of the parameters of block ``j + 1`` from the
        end that train only once that block is open (its norm layers kept trainable by
        ``train_norm`` train from the start).
    """

    stages: tuple
    waiting: tuple

    def open_at(self, done: int) -> int:
        """Blocks open after ``done`` finished epochs."""
        return max([n for e, n in self.stages if e <= done] or [0])

    def apply(self, backbone: nn.Module, done: int) -> int:
        """Freeze the blocks still waiting after ``done`` epochs, open the others; returns the
        number of open blocks."""
        n = self.open_at(done)
        params = dict(backbone.named_parameters())
        for j, names in enumerate(self.waiting):
            for name in names:
                params[name].requires_grad_(j < n)
        return n

    def open_all(self, backbone: nn.Module) -> None:
        """Every scheduled block trainable: the model as trained (checkpoints, snapshots)."""
        self.apply(backbone, max(e for e, _ in self.stages))


def freeze_for_training(backbone, cfg: dict) -> ThawPlan | None:
    """Freeze ``backbone`` as the config says (``train_norm``, ``unfreeze_last``,
    ``unfreeze_schedule``), every block the schedule ever opens trainable.

    Returns
    -------
    ThawPlan or None
        None when nothing thaws after the start (no schedule, or one stage): the open blocks
        train from the first step, as with ``unfreeze_last``.
    """
    train_norm = cfg["train_norm"]
    # Validates unfreeze_last (and train_norm) and is the result when nothing is scheduled.
    freeze_backbone(backbone, train_norm=train_norm, unfreeze_last=cfg["unfreeze_last"])
    stages = resolve_stages(cfg["unfreeze_schedule"], len(backbone.blocks()),
                            cfg["unfreeze_last"], getattr(backbone, "name", "this backbone"))
    if len(stages) < 2:  # nothing thaws later: the blocks open at epoch 0 train throughout
        if stages:
            freeze_backbone(backbone, train_norm=train_norm, unfreeze_last=stages[0][1])
        return None
    top = max(n for _, n in stages)
    freeze_backbone(backbone, train_norm=train_norm, unfreeze_last=0)
    always = {id(p) for p in backbone.parameters() if p.requires_grad}
    freeze_backbone(backbone, train_norm=train_norm, unfreeze_last=top)
    names = {id(p): n for n, p in backbone.named_parameters()}
    blocks = backbone.blocks()[::-1][:top]
    waiting = tuple(tuple(names[id(p)] for p in block.parameters()
                          if p.requires_grad and id(p) not in always) for block in blocks)
    return ThawPlan(stages, waiting)


# --------------------------------------------------------------------------- lr decay

def param_groups(model: nn.Module, cfg: dict) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of ``model``.

    With ``lr_decay`` 1 (off): one group at ``lr``, as before. Otherwise the head (every
    parameter outside ``model.backbone``) gets ``lr``, the last backbone block ``lr *
    decay``, the one before ``lr * decay**2``, ...; backbone parameters in no block (a stem,
    patch embeddings) come before the first block. Norm layers belong to their block's
    group. Groups are ordered head first, then from the last block back; each carries
    ``name`` and ``depth`` (0 = head).
    """
    lr = float(cfg["lr"])  # both checked by kit.schema: lr > 0, lr_decay in (0, 1]
    decay = float(cfg["lr_decay"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    backbone = getattr(model, "backbone", None)
    if decay == 1.0 or backbone is None:
        return [{"params": trainable, "lr": lr, "name": "all", "depth": 0}]
    blocks = backbone.blocks()
    depth = {}
    for j, block in enumerate(reversed(blocks), start=1):
        for p in block.parameters():
            depth.setdefault(id(p), j)
    in_backbone = {id(p) for p in backbone.parameters()}
    stem = len(blocks) + 1
    by_depth: dict[int, list] = {}
    for p in trainable:
        d = 0 if id(p) not in in_backbone else depth.get(id(p), stem)
        by_depth.setdefault(d, []).append(p)
    return [{"params": by_depth[d], "lr": lr * decay ** d, "depth": d,
             "name": "head" if d == 0 else "stem" if d == stem else f"block -{d}"}
            for d in sorted(by_depth)]
