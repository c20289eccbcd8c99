"""HADA's training objective: ITC over batch + queue mixed with the main backbone, plus ITM.

What the paper (and its public code, built on ALBEF) trains, in one module:

* **ITC** with multi-positive targets by image id (a caption's image may appear several times in the
  batch and in the queue; all of them are positives, the target row sums to one). The logits mix the
  HADA similarity with the main backbone's own cosine, ``s = ((1 - w) s_HADA + w s_main) / tau``, with a
  learned temperature ``tau`` (init 0.07, clamped to [0.001, 0.5]) and a learned mix weight ``w``
  (init 0.5, clamped to [0.1, 0.9]); ``mix=False`` fixes ``w = 0``. The loss is
  ``i2t_weight * L_i2t + t2i_weight * L_t2i`` (paper: 0.3 / 0.7).
* **Momentum encoders** (EMA 0.995 of the trained encoders) fill a **queue** of negatives; their
  similarities can also soften the targets (**momentum distillation**, alpha 0.4).
* **ITM**: a small discriminator on ``[a, b, |a-b|, a*b]`` of the two L2-normalised embeddings, one
  hard negative each way sampled from the in-batch similarity (by default, as published, of each online
  embedding against the momentum encoders' keys of the batch; ``itm_keys="online"``: against the online
  embeddings), binary cross-entropy, weight 1.
  Training only: inference is the mixed cosine (:meth:`HadaObjective.inference_weights`).

Under DDP (:mod:`hada.distributed`) each rank's momentum keys (and ids) of the step are all-gathered, in rank
order, so a rank's local queries score against the global batch's keys plus the queue, and the queue receives
every rank's keys and stays identical on every rank (as ALBEF does). Keys carry no gradient, so with the
gradient averaging of DDP the ITC gradient equals that of one process with the global batch. Hard negatives
are drawn from the rank's local batch, as in ALBEF. With one process nothing is gathered.

The objective wraps any *pair* module with ``.image`` and ``.text`` encoders mapping a
``ModalityBatch`` to L2-normalised embeddings, so the no-graph concatenation baseline
(:mod:`hada.baselines`) trains with exactly the same loss as HADA.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hada import distributed
from hada.config import LossConfig


# ----------------------------------------------------------------------------------------- pieces
def multi_positive_targets(ids: Tensor, ids_all: Tensor) -> Tensor:
    """Soft targets [B, M]: uniform over every column with the same image id (each row sums to one)."""
    pos = (ids.view(-1, 1) == ids_all.view(1, -1)).float()
    return pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)


def against(x: Tensor, parts: tuple[Tensor, ...]) -> Tensor:
    """``x @ cat(parts).T`` without concatenating ``parts``: the batch's keys and a 64k-slot queue are scored
    separately, so the queue is never copied (a copy of it per step cost a fifth of a published-recipe step)."""
    return torch.cat([x @ part.T for part in parts], dim=1)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of ``-sum_j targets_ij log softmax(logits)_ij``."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def sample_hard_negatives(sim: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """One negative column per row, drawn with probability softmax(sim) over the non-positive columns.

    Returns ``(index[B], valid[B])``; a row whose columns are all positives (e.g. every caption of the
    batch describes the same image) has no negative and ``valid`` False. Uses the global torch RNG, whose
    state the trainer checkpoints, so resumed runs draw the same negatives.
    """
    with torch.no_grad():
        weights = F.softmax(sim.float(), dim=1) + 1e-5
        weights = weights.masked_fill(positive, 0.0)
        valid = ~positive.all(dim=1)
        weights.masked_fill_(~valid.unsqueeze(1), 1.0)  # any draw; the row is masked out by ``valid``
        index = torch.multinomial(weights, 1).squeeze(1)
    return index, valid


class ItmHead(nn.Module):
    """Binary image-text matching discriminator on ``[a, b, |a-b|, a*b]``: an MLP (``kind="mlp"``), or the
    published Dropout + Linear(4 dim -> 1) (``kind="linear"``: 2,049 parameters at dim 512)."""

    def __init__(self, dim: int, hidden: int = 0, kind: str = "mlp", dropout: float = 0.0):
        super().__init__()
        if kind == "linear":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * dim, 1))
            return
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(4 * dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.net(torch.cat([a, b, (a - b).abs(), a * b], dim=-1)).squeeze(-1)


#: The image id of a random queue slot: no image has it, so a random slot is never a positive.
RANDOM_ID = -2


class FeatureQueue(nn.Module):
    """Ring buffer of momentum features (HADA and main backbone, both modalities) and their image ids.

    Kept as buffers, so the queue is part of the state dict and of every checkpoint. With ``init="empty"`` only
    filled slots are used: an empty queue adds no random negatives. With ``init="random"`` (ALBEF's, the
    published) every slot starts as a random unit vector with an id that matches nothing, and the whole queue
    is used from the first step.
    """

    def __init__(self, size: int, dim: int, main_dim: int, init: str = "empty"):
        super().__init__()
        self.size = int(size)
        random = init == "random"
        for name, width in (("image", dim), ("text", dim), ("image_main", main_dim), ("text_main", main_dim)):
            value = F.normalize(torch.randn(self.size, width), dim=1) if random else torch.zeros(self.size, width)
            self.register_buffer(name, value)
        self.register_buffer("ids", torch.full((self.size,), RANDOM_ID if random else -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.full((), self.size if random else 0, dtype=torch.long))
        self._host: tuple[int, int] | None = (0, self.size if random else 0)  # (ptr, count) as Python ints

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None  # the loaded buffers say where the ring is

    def _ring(self) -> tuple[int, int]:
        """(ptr, count) without reading the buffers back from the device at every step (a host sync each on a
        GPU): known at construction, read back once after a load, then updated alongside the buffers."""
        if self._host is None:
            ptr, count = torch.stack([self.ptr, self.count]).tolist()
            self._host = (ptr, count)
        return self._host

    def filled(self) -> dict[str, Tensor]:
        n = self._ring()[1]
        return {name: getattr(self, name)[:n] for name in ("image", "text", "image_main", "text_main", "ids")}

    @torch.no_grad()
    def push(self, image: Tensor, text: Tensor, image_main: Tensor, text_main: Tensor, ids: Tensor) -> None:
        if self.size == 0:
            return
        items = {"image": image, "text": text, "image_main": image_main, "text_main": text_main, "ids": ids}
        n = ids.shape[0]
        if n > self.size:  # only the newest ``size`` entries survive anyway
            items = {k: v[n - self.size:] for k, v in items.items()}
            n = self.size
        ptr, count = self._ring()
        slots = (ptr + torch.arange(n, device=self.ids.device)) % self.size
        for name, value in items.items():
            getattr(self, name)[slots] = value.detach().to(getattr(self, name).dtype)
        self._host = ((ptr + n) % self.size, min(self.size, count + n))
        self.ptr.fill_(self._host[0])
        self.count.fill_(self._host[1])


@dataclass
class LossOutput:
    loss: Tensor  # what the optimiser minimises
    itc: Tensor
    itm: Tensor
    itm_accuracy: Tensor  # fraction of ITM pairs classified right (positives and hard negatives); NaN without ITM


# -------------------------------------------------------------------------------------- objective
class HadaObjective(nn.Module):
    """The trained pair + its momentum copy, tau, w, the ITM head and the queue: everything a checkpoint holds.

    ``pair`` must have ``.image`` and ``.text`` modules mapping a ModalityBatch to L2-normalised
    embeddings ``[B, dim]``. The main backbone is backbone 0 of the batch: its own cosine is
    ``normalize(batch.embeds[0])`` (batching keeps embeddings cosine-preserving for that reason).
    """

    def __init__(self, pair: nn.Module, config: LossConfig, dim: int, main_dim: int, init: str = "default"):
        super().__init__()
        self.config = config
        self.pair = pair
        self.temp = nn.Parameter(torch.tensor(float(config.tau_init)))
        if config.mix:
            self.mix_weight = nn.Parameter(torch.tensor(float(config.w_init)))
        else:
            self.register_buffer("mix_weight", torch.zeros(()))
        self.pair_m = None
        if config.use_momentum and (config.queue_size > 0 or config.distill):
            self.pair_m = copy.deepcopy(pair)
            for p in self.pair_m.parameters():
                p.requires_grad_(False)
        self.itm_head = ItmHead(dim, config.itm_hidden, config.itm_head, config.itm_dropout) if config.itm else None
        if self.itm_head is not None and init == "kaiming":
            from hada.model.encoder import kaiming_init

            kaiming_init(self.itm_head)
        self.queue = FeatureQueue(config.queue_size, dim, main_dim, config.queue_init)
        #: Epochs of training done, fractional within an epoch (the trainer sets it before every step): the
        #: distillation ramp and the two stages read it. Outside training, after all of it.
        self.progress = math.inf
        self._pending: list[Tensor] | None = None  # the last step's keys, not yet in the queue

    # -- learned scalars ---------------------------------------------------------------------------
    def tau(self) -> Tensor:
        return self.temp.clamp(self.config.tau_min, self.config.tau_max)

    def mixing(self) -> bool:
        """Whether the main backbone's similarity is mixed in now: with ``mix``, from epoch ``mix_from_epoch``
        on (before it the HADA similarity alone: the first of HADA-LAVIS's two stages)."""
        return self.config.mix and self.progress >= self.config.mix_from_epoch

    def w(self) -> Tensor:
        if not self.config.mix:
            return self.mix_weight
        if not self.mixing():
            return torch.zeros_like(self.mix_weight)
        return self.mix_weight.clamp(self.config.w_min, self.config.w_max)

    def alpha(self) -> float:
        """The distillation weight now: ``alpha``, ramped up linearly over the first epoch with ``alpha_ramp``."""
        if not self.config.alpha_ramp:
            return self.config.alpha
        return self.config.alpha * min(1.0, self.progress)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep tau and w inside their ranges (called before each forward and after each step)."""
        self.temp.clamp_(self.config.tau_min, self.config.tau_max)
        if self.config.mix:
            self.mix_weight.clamp_(self.config.w_min, self.config.w_max)

    def end_step(self) -> None:
        """After the optimiser step: enqueue this step's keys and clamp tau and w. The keys wait until now because
        the scores against the queue keep it for the backward pass (overwriting slots before that would corrupt
        the gradient, and copying the queue each step is what this avoids). A forward also enqueues keys that no
        ``end_step`` took."""
        self._enqueue_pending()
        self.clamp_()

    @torch.no_grad()
    def _enqueue_pending(self) -> None:
        if self._pending is not None:
            self.queue.push(*self._pending)
            self._pending = None

    @torch.no_grad()
    def momentum_update(self) -> None:
        if self.pair_m is None:
            return
        m = self.config.momentum
        online, ema = list(self.pair.parameters()), list(self.pair_m.parameters())
        torch._foreach_mul_(ema, m)  # the same two element-wise ops as a per-tensor loop, in one call
        torch._foreach_add_(ema, [p.detach() for p in online], alpha=1.0 - m)

    def inference_weights(self) -> tuple[float, float]:
        """(weight of the HADA cosine, weight of the main backbone's cosine) for retrieval scoring."""
        w = float(self.w().detach())
        return 1.0 - w, w

    # -- encoders ----------------------------------------------------------------------------------
    @staticmethod
    def main_embedding(batch) -> Tensor:
        return F.normalize(batch.embeds[0].float(), dim=-1)

    def _mixed(self, hada: Tensor, main: Tensor, w: Tensor) -> Tensor:
        if not self.mixing():
            return hada
        return (1.0 - w) * hada + w * main

    # -- the loss ----------------------------------------------------------------------------------
    def forward(self, image, text, image_ids: Tensor) -> LossOutput:
        """Loss of one batch of caption-image pairs; ``image_ids`` [B] identifies each caption's image."""
        cfg = self.config
        self._enqueue_pending()
        self.clamp_()
        tau, w = self.tau(), self.w()
        image_ids = image_ids.long().view(-1)
        img = self.pair.image(image)
        txt = self.pair.text(text)
        img_main = self.main_embedding(image)
        txt_main = self.main_embedding(text)

        with torch.no_grad():
            self.momentum_update()
            if self.pair_m is not None:
                img_m, txt_m = self.pair_m.image(image), self.pair_m.text(text)
            else:
                img_m, txt_m = img.detach(), txt.detach()
            keys, offset, share = self._batch_keys(img_m, txt_m, img_main, txt_main, image_ids)
            q = self.queue.filled()
            alpha = self.alpha()
            img_all, txt_all = (keys[0], q["image"]), (keys[1], q["text"])
            img_main_all, txt_main_all = (keys[2], q["image_main"]), (keys[3], q["text_main"])
            targets = multi_positive_targets(image_ids, torch.cat([keys[4], q["ids"]]))
            targets_i2t = targets_t2i = targets
            if cfg.distill:
                if cfg.distill_source == "hada":  # the HADA-only momentum similarity (published)
                    sim_i2t_m, sim_t2i_m = against(img_m, txt_all) / tau, against(txt_m, img_all) / tau
                else:
                    sim_i2t_m = self._mixed(against(img_m, txt_all), against(img_main, txt_main_all), w) / tau
                    sim_t2i_m = self._mixed(against(txt_m, img_all), against(txt_main, img_main_all), w) / tau
                targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
                targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets

        sim_i2t = self._mixed(against(img, txt_all), against(img_main, txt_main_all), w) / tau
        sim_t2i = self._mixed(against(txt, img_all), against(txt_main, img_main_all), w) / tau
        itc = cfg.i2t_weight * soft_cross_entropy(sim_i2t, targets_i2t) + cfg.t2i_weight * soft_cross_entropy(
            sim_t2i, targets_t2i
        )

        itm = torch.zeros((), device=itc.device)
        itm_acc = torch.full((), float("nan"), device=itc.device)
        if self.itm_head is not None:
            local = slice(offset, offset + img.shape[0])  # this rank's own columns
            if cfg.itm_keys == "momentum":  # each online embedding against the batch's momentum keys (published)
                if cfg.itm_negatives == "hada":  # the HADA-only similarity (published)
                    hard_i2t, hard_t2i = img @ txt_m.T / tau, txt @ img_m.T / tau
                else:  # the ITC logits' own columns of the local batch
                    hard_i2t, hard_t2i = sim_i2t[:, local], sim_t2i[:, local]
            else:  # online against online
                hard_i2t = img @ txt.T
                if cfg.itm_negatives != "hada":
                    hard_i2t = self._mixed(hard_i2t, img_main @ txt_main.T, w)
                hard_i2t = hard_i2t / tau
                hard_t2i = hard_i2t.T
            itm, itm_acc = self._itm(img, txt, hard_i2t, hard_t2i, image_ids)
        loss = itc + cfg.itm_weight * itm if self.itm_head is not None else itc
        loss = self._touch_idle(loss)
        if share != 1.0:  # a short last batch split unevenly: weigh each rank by its rows (see _batch_keys)
            loss, itc, itm = loss * share, itc * share, itm * share

        self._pending = keys  # enqueued once the backward pass no longer needs the queue (end_step)
        return LossOutput(loss=loss, itc=itc.detach(), itm=itm.detach(), itm_accuracy=itm_acc)

    def idle_parameters(self) -> list[nn.Parameter]:
        """Trained parameters this step's loss does not depend on: the mix weight before ``mix_from_epoch``."""
        return [self.mix_weight] if self.config.mix and not self.mixing() else []

    def _touch_idle(self, loss: Tensor) -> Tensor:
        """``loss + 0 * p`` for every idle parameter: the same loss, bit for bit, but every parameter receives a
        (zero) gradient, which DistributedDataParallel without ``find_unused_parameters`` waits for. The trainer
        drops those zero gradients before the optimiser step (:meth:`drop_idle_grads`), so AdamW skips them."""
        for p in self.idle_parameters():
            loss = loss + 0.0 * p.sum()
        return loss

    def drop_idle_grads(self) -> None:
        """Forget the zero gradients of :meth:`_touch_idle`: an idle parameter is left alone by the optimiser (no
        weight decay, no moment update), as when it had no gradient at all."""
        for p in self.idle_parameters():
            p.grad = None

    @staticmethod
    def _batch_keys(*keys: Tensor) -> tuple[list[Tensor], int, float]:
        """The step's keys of every rank (in rank order), where this rank's rows start among them, and its share.

        DDP averages the ranks' gradients; scaled by ``share = ranks * rows / global rows`` the average of the
        ranks' mean losses is the mean over the global batch, also when the ranks hold different row counts.
        """
        if not distributed.active():
            return list(keys), 0, 1.0
        gathered, counts = distributed.all_gather_rows(list(keys))
        rank = distributed.rank()
        return gathered, sum(counts[:rank]), len(counts) * counts[rank] / sum(counts)

    def _itm(self, img: Tensor, txt: Tensor, sim_i2t: Tensor, sim_t2i: Tensor, ids: Tensor):
        """ITM on hard negatives; ``sim_*`` [B, B]: the local batch against its own columns."""
        b = img.shape[0]
        positive = ids.view(-1, 1) == ids.view(1, -1)
        neg_img, valid_t = sample_hard_negatives(sim_t2i.detach(), positive)  # per text, an image
        neg_txt, valid_i = sample_hard_negatives(sim_i2t.detach(), positive)  # per image, a text
        keep_t, keep_i = valid_t, valid_i  # the rows with a negative (boolean masks: a host sync each use)
        if bool(torch.cat([valid_t, valid_i]).all()):  # the usual case, and the one host sync of ITM
            keep_t = keep_i = torch.arange(b, device=img.device)  # the same rows and the same ops, without syncs
        a = torch.cat([img, img[neg_img[keep_t]], img[keep_i]])
        t = torch.cat([txt, txt[keep_t], txt[neg_txt[keep_i]]])
        labels = torch.cat([torch.ones(b, device=img.device), torch.zeros(a.shape[0] - b, device=img.device)])
        logits = self.itm_head(a, t)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        acc = ((logits.detach() > 0).float() == labels).float().mean()  # a tensor: read back once per epoch
        return loss, acc
