"""Classification heads (an MLP built from config) and the backbone + head patch classifier."""
from __future__ import annotations

import torch
from torch import nn

from kit.utils import KitError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}
NORMS = {"none": None, "layernorm": nn.LayerNorm, "batchnorm": nn.BatchNorm1d}
MAX_DEPTH = 4


class Standardize(nn.Module):
    """Per-dimension ``(x - mean) / std`` with statistics set once from a fold's training
    rows (:meth:`fit`) and kept as buffers, so checkpoints carry them.

    Backbones differ in feature scale by orders of magnitude (a random frozen EfficientNet
    gives ~3e-5); without this an MLP head can collapse to one class silently.
    """

    def __init__(self, in_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> "Standardize":
        """Set the statistics from ``n x D`` features (float64 sums, then stored as float32)."""
        f = features.detach().reshape(-1, self.mean.numel()).double()
        if len(f) < 2:
            raise KitError("head: need at least 2 feature vectors to standardise")
        self.mean.copy_(f.mean(0).float())
        # A dimension that never varies (a dead channel) is left unscaled, not blown up.
        std = f.std(0)
        self.std.copy_(torch.where(std > self.eps * (1 + f.abs().mean(0)), std,
                                   torch.ones_like(std)).float())
        self.fitted.fill_(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


POOLS = ("mean_prob", "mean_logprob", "attention")
HEAD_TYPES = ("mlp", "logreg")


class LinearProbe(nn.Sequential):
    """The ``logreg`` head: standardisation then one linear layer, whose weights are not
    trained by gradient steps but fitted in closed form by scikit-learn's
    ``LogisticRegression`` (:mod:`kit.training.probe`) on image-mean embeddings.

    For a linear map, the mean of the patch logits is the logit of the mean patch, so this
    head on patches pooled by ``mean_logprob`` predicts exactly what the probe was fitted to.
    Its state dict is that of an ``mlp`` head of depth 0, so checkpoints load the same way.
    """

    closed_form = True

    def __init__(self, in_features: int, num_classes: int, standardize: bool = True):
        layers = [Standardize(in_features)] if standardize else []
        super().__init__(*layers, nn.Linear(in_features, num_classes))

    @property
    def linear(self) -> nn.Linear:
        return self[-1]


def is_probe(model: nn.Module) -> bool:
    """Whether ``model`` (a head, or a classifier holding one) is fitted in closed form."""
    head = getattr(model, "head", model)
    return bool(getattr(head, "closed_form", False))


def create_head(in_features: int, num_classes: int, depth: int = 1, width: int = 256,
                dropout: float = 0.3, activation: str = "relu",
                norm: str = "none", standardize: bool = True,
                pool: str = "mean_prob", type: str = "mlp") -> nn.Module:
    """A head from features to logits: a patch MLP, or attention MIL over an image's patches.

    With ``standardize`` the first module is a :class:`Standardize` (its statistics are set
    by the training loop from the fold's training rows). Each of the ``depth`` hidden layers
    is Linear -> norm -> activation -> Dropout; the last layer is a Linear to
    ``num_classes``. ``depth=0`` is a linear classifier with Dropout on its input features.

    Parameters
    ----------
    in_features, num_classes : int
        Input feature size and number of output logits.
    depth : int
        Hidden layers, 0..4.
    width : int
        Size of each hidden layer.
    dropout : float
        Dropout probability in [0, 1).
    activation : {"relu", "gelu"}
    norm : {"none", "layernorm", "batchnorm"}
        ``batchnorm`` (BatchNorm1d) needs training batches of at least 2.
    standardize : bool
        Standardise the input features per dimension (statistics from the training rows).
    pool : {"mean_prob", "mean_logprob", "attention"}
        How an image's patches make one prediction. The first two: the head classifies each
        patch (a ``nn.Sequential`` on ``B x D``) and the image probability is the mean of the
        patch probabilities, or the softmax of their mean log-probability. ``attention``:
        an :class:`AttentionMIL` head on ``B x K x D`` giving image logits.
    type : {"mlp", "logreg"}
        ``logreg``: a :class:`LinearProbe` (the MLP settings do not apply; ``pool`` must be
        ``mean_logprob`` or ``mean_prob``).
    """
    activation, norm = _check(in_features, num_classes, depth, width, dropout, activation, norm)
    if pool not in POOLS:
        raise KitError(f"head config: pool must be one of {', '.join(POOLS)} (got {pool!r})")
    if type not in HEAD_TYPES:
        raise KitError(f"head config: type must be one of {', '.join(HEAD_TYPES)} (got {type!r})")
    if type == "logreg":
        if pool == "attention":
            raise KitError("head config: type logreg pools patches with mean_logprob, not "
                           "attention; set head.pool=mean_logprob")
        return LinearProbe(in_features, num_classes, standardize)
    if pool == "attention":
        return AttentionMIL(in_features, num_classes, depth, width, dropout, activation, norm,
                            standardize)
    layers: list[nn.Module] = [Standardize(in_features)] if standardize else []
    if depth == 0 and dropout > 0:
        layers.append(nn.Dropout(dropout))
    hidden, size = _hidden(in_features, depth, width, dropout, activation, norm)
    layers += hidden
    layers.append(nn.Linear(size, num_classes))
    return nn.Sequential(*layers)


def _hidden(in_features, depth, width, dropout, activation, norm):
    """The hidden layers of a head and the size they end with."""
    layers: list[nn.Module] = []
    size = in_features
    for _ in range(depth):
        layers.append(nn.Linear(size, width))
        if NORMS[norm] is not None:
            layers.append(NORMS[norm](width))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        size = width
    return layers, size


class AttentionMIL(nn.Module):
    """Gated attention pooling over an image's patch embeddings (Ilse et al., 2018).

    ``B x K x D`` -> standardise -> hidden layers per patch (``h_k``) -> attention weights
    ``a = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`` -> ``z = sum_k a_k h_k`` -> Linear
    to the class logits. Trained with the image label, so a patch without tumour can get
    little weight instead of inheriting the image's class.
    """

    is_mil = True

    def __init__(self, in_features: int, num_classes: int, depth: int = 1, width: int = 256,
                 dropout: float = 0.3, activation: str = "relu", norm: str = "none",
                 standardize: bool = True, attention_dim: int = 128):
        super().__init__()
        self.standardize = Standardize(in_features) if standardize else nn.Identity()
        hidden, size = _hidden(in_features, depth, width, dropout, activation, norm)
        self.encoder = nn.Sequential(*hidden)
        self.attention_v = nn.Linear(size, attention_dim)
        self.attention_u = nn.Linear(size, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(size, num_classes)  # last Linear: the output size

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise KitError(f"attention head: expected B x K x D patch embeddings, got shape "
                           f"{tuple(x.shape)}")
        b, k, d = x.shape
        return self.encoder(self.standardize(x.reshape(b * k, d))).reshape(b, k, -1)

    def _weights(self, h: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        return torch.softmax(self.attention_w(gate).squeeze(-1).float(), dim=1).to(h.dtype)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``B x K`` (rows sum to 1)."""
        return self._weights(self._encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._encode(x)
        z = (self._weights(h).unsqueeze(-1) * h).sum(1)
        return self.classifier(self.dropout(z))


def is_mil(head: nn.Module) -> bool:
    """Whether ``head`` maps a whole image's patches to one prediction."""
    return bool(getattr(head, "is_mil", False))


def is_mil_config(head_cfg: dict) -> bool:
    """Whether a head config (train.yaml's ``head``) builds such a head: training then
    draws whole images, not patches."""
    return head_cfg["pool"] == "attention"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(in_features, num_classes, depth, width, dropout, activation, norm):
    problems = []
    for key, value, low in (("in_features", in_features, 1), ("num_classes", num_classes, 1),
                            ("width", width, 1)):
        if not _is_int(value) or value < low:
            problems.append(f"{key} must be a positive integer (got {value!r})")
    if not _is_int(depth) or not 0 <= depth <= MAX_DEPTH:
        problems.append(f"depth must be an integer in 0..{MAX_DEPTH} (got {depth!r})")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"dropout must be a number in [0, 1) (got {dropout!r})")
    act = str(activation).lower()
    if act not in ACTIVATIONS:
        problems.append(f"activation must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")
    nrm = "none" if norm is None else str(norm).lower()
    if nrm not in NORMS:
        problems.append(f"norm must be one of {', '.join(NORMS)} (got {norm!r})")
    if problems:
        raise KitError("head config: " + "; ".join(problems), problems)
    return act, nrm


class PatchClassifier(nn.Module):
    """A backbone and a head: ``forward(x)`` maps normalised patches to class logits.

    Parameters
    ----------
    backbone : kit.models.backbones.Backbone
    head : nn.Module
        Maps ``backbone.num_features`` features to logits (see :func:`create_head`).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features, ``B x num_features``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def standardizer(model: nn.Module) -> Standardize | None:
    """The model's :class:`Standardize` layer, if its head has one."""
    return next((m for m in model.modules() if isinstance(m, Standardize)), None)


class MILClassifier(PatchClassifier):
    """A backbone and an :class:`AttentionMIL` head: ``forward(x)`` maps whole images,
    ``B x K x C x H x W`` normalised patches, to image logits ``B x classes``."""

    is_mil = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k = x.shape[:2]
        return self.head(self.backbone(x.flatten(0, 1)).reshape(b, k, -1))
