"""The fast half of Cogment's long-term memory: slots written when the memory is surprised.

What is stored: associations "at answer offset j of cue c, the token is t". A *cue* is the part of an
example that names what it is about (a question, a puzzle; ``batch["cue"]``). Addresses and contents are
fixed random codes, so a slot written at step 100 still means the same at step 10,000 (learned keys
would drift away from what was written):

* the cue's code is a random +-1 vector drawn from a hash of the cue's tokens (in order): the same cue
  always gets the same code, any other cue (even one token apart) a nearly orthogonal one, so recall is
  exact-match, not by similarity; the key of position i binds the cue code to i's offset from the cue's
  start (an elementwise product with a random +-1 offset code), so a question asked with or without a
  long context in front addresses the same slots;
* a slot's value is the mass-weighted mean of the value codes of the tokens written to it.

Reading (every forward, no gradient: the codes and slots are constants): softmax attention of each
position's key over the occupied slots, ``sharpness * cos(key, slot) + log(mass)``, against a "nothing
stored" null slot at ``sharpness * null_threshold``; the result is the mean value read (zero when nothing
matches). The model learns by backprop how to use what it reads (models/cogment/memory.py).

Writing (``write``, called from a training step's callback, outside backprop): for every scored position,
the memory's own prediction is the token whose value code is closest to what it read; its surprise is
that prediction's cross-entropy against the label. Positions whose surprise passes the gate
(``sigmoid(gate_sharpness * (surprise - surprise_threshold)) >= 0.5``) are written, the most surprising
first (``max_writes_per_step``): into the slot whose key matches (cos >= ``match_threshold``), else into a
free slot, else over the weakest. A write adds ``rate * gate`` of mass (the stage's memory-write rate).
``decay`` shrinks every slot's mass by a factor (1 - decay) per step; ``consolidate`` (on a schedule)
frees slots whose mass fell below ``min_mass`` and merges slots whose keys coincide. Everything is in
buffers, so checkpoints hold it and a resumed run continues bitwise exactly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class AddressCodes(nn.Module):
    """Fixed random codes: the cue's key code is drawn from a hash of the cue's tokens, so the same cue (in any
    context) gets the same code and any other cue, even one token apart, a nearly orthogonal one; offset codes
    [L, K] and value codes [V, Dv] are +-1 tables drawn from ``seed`` on the CPU at construction
    (non-persistent buffers: the same seed gives the same codes, so checkpoints need not hold them)."""

    PRIME = 2_147_483_647  # 2^31 - 1: products of two residues stay below 2^62, exact in int64

    def __init__(self, vocab_size: int, max_len: int, key_dim: int, value_dim: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(20240 + seed)

        def bipolar(*shape: int) -> torch.Tensor:
            return torch.randint(0, 2, shape, generator=generator, device="cpu").float() * 2 - 1

        def residues(*shape: int) -> torch.Tensor:
            return torch.randint(1, self.PRIME, shape, generator=generator, device="cpu", dtype=torch.long)

        self.register_buffer("offset", bipolar(max_len, key_dim), persistent=False)
        self.register_buffer("value", bipolar(vocab_size, value_dim) / math.sqrt(value_dim), persistent=False)
        # The cue hash is sum_p (token_p + 1) * base^p (mod PRIME), p counted from the cue's start; each key
        # dimension k is then the parity of (a_k * hash + b_k) mod PRIME (a universal hash per dimension).
        base = int(residues(1))
        powers = [1]
        for _ in range(max_len - 1):
            powers.append(powers[-1] * base % self.PRIME)
        self.register_buffer("powers", torch.tensor(powers, dtype=torch.long), persistent=False)
        self.register_buffer("hash_a", residues(key_dim), persistent=False)
        self.register_buffer("hash_b", residues(key_dim), persistent=False)

    @torch.no_grad()
    def cue_hash(self, inputs: torch.Tensor, cue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] hash of each row's cue tokens in order, [B, L] offset of every position from the cue's start)."""
        length = inputs.shape[1]
        start = cue.float().argmax(dim=1)  # first cue position (0 for rows without one)
        relative = (torch.arange(length, device=inputs.device).unsqueeze(0) - start.unsqueeze(1)) % length
        terms = (inputs.long() + 1) * self.powers[relative] % self.PRIME * cue
        return terms.sum(dim=1) % self.PRIME, relative

    @torch.no_grad()
    def keys(self, inputs: torch.Tensor, cue: torch.Tensor) -> torch.Tensor:
        """[B, L, K] unit keys of every position (zero for rows without a cue)."""
        cue_hash, relative = self.cue_hash(inputs, cue)
        bits = (self.hash_a.unsqueeze(0) * cue_hash.unsqueeze(1) + self.hash_b) % self.PRIME % 2
        code = (bits.float() * 2 - 1) / math.sqrt(bits.shape[1]) * cue.any(dim=1, keepdim=True)
        return code.unsqueeze(1) * self.offset[relative]  # +-1 products keep the norm


class EpisodicSlots(nn.Module):
    """The slot store: keys [M, K], values [M, Dv], mass [M]; see the module docstring."""

    def __init__(self, slots: int, key_dim: int, value_dim: int, sharpness: float = 20.0, null_threshold: float = 0.5,
                 value_sharpness: float = 20.0, surprise_threshold: float = 1.0, gate_sharpness: float = 4.0,
                 match_threshold: float = 0.9, merge_threshold: float = 0.95, min_mass: float = 1e-3,
                 max_writes_per_step: int = 256) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"model.episodic_slots must be >= 1, got {slots}")
        self.sharpness, self.null_threshold, self.value_sharpness = sharpness, null_threshold, value_sharpness
        self.surprise_threshold, self.gate_sharpness = surprise_threshold, gate_sharpness
        self.match_threshold, self.merge_threshold, self.min_mass = match_threshold, merge_threshold, min_mass
        self.max_writes_per_step = max_writes_per_step
        self.register_buffer("slot_keys", torch.zeros(slots, key_dim))
        self.register_buffer("slot_values", torch.zeros(slots, value_dim))
        self.register_buffer("slot_mass", torch.zeros(slots))
        self.register_buffer("writes", torch.zeros((), dtype=torch.long))  # positions written so far

    @property
    def occupied(self) -> torch.Tensor:
        return self.slot_mass > 0

    @torch.no_grad()
    def read(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values read [B, L, Dv], attention on the null slot [B, L]) for ``keys`` [B, L, K]."""
        batch, length, _ = keys.shape
        occupied = self.occupied
        if not bool(occupied.any()):  # nothing stored: everything goes to the null slot
            return keys.new_zeros(batch, length, self.slot_values.shape[1]), keys.new_ones(batch, length)
        slot_keys, slot_values = self.slot_keys[occupied], self.slot_values[occupied]
        scores = self.sharpness * keys.float() @ slot_keys.t() + self.slot_mass[occupied].log()
        null = torch.full((batch, length, 1), self.sharpness * self.null_threshold, device=keys.device)
        attention = torch.cat([scores, null], dim=-1).softmax(dim=-1)
        return attention[..., :-1] @ slot_values, attention[..., -1]

    @torch.no_grad()
    def surprise(self, values_read: torch.Tensor, value_codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the memory's own prediction (``values_read`` [N, Dv] decoded against the value
        codes [V, Dv]) at ``labels`` [N]: high when the memory does not know the answer."""
        logits = self.value_sharpness * values_read.float() @ value_codes.t()
        return F.cross_entropy(logits, labels, reduction="none")

    @torch.no_grad()
    def write(self, keys: torch.Tensor, values_read: torch.Tensor, labels: torch.Tensor, value_codes: torch.Tensor,
              rate: float, ignore_index: int = -100, synchronize: bool = True,
              max_writes: int | None = None) -> dict[str, float]:
        """Surprise-gated write of the scored positions (``labels != ignore_index``) of a training batch.

        ``keys`` [B, L, K], ``values_read`` [B, L, Dv] (what the forward read), ``labels`` [B, L]. Returns
        counts for logging. Under torch.distributed every rank writes every rank's candidates, in rank order,
        so the slots stay identical across ranks (``synchronize=False``: only its own, into a local copy).
        ``max_writes``: the most positions written (default ``max_writes_per_step``).
        """
        scored = (labels != ignore_index) & (keys.abs().sum(-1) > 0)
        cand_keys, cand_read, cand_labels = keys[scored].float(), values_read[scored].float(), labels[scored]
        surprise = self.surprise(cand_read, value_codes, cand_labels)
        gate = torch.sigmoid(self.gate_sharpness * (surprise - self.surprise_threshold))
        chosen = gate >= 0.5
        cand_keys, cand_labels, gate, surprise = cand_keys[chosen], cand_labels[chosen], gate[chosen], surprise[chosen]
        limit = self.max_writes_per_step if max_writes is None else max_writes
        order = surprise.argsort(descending=True)[:limit]
        cand_keys, cand_labels, gate = cand_keys[order], cand_labels[order], gate[order]
        if synchronize and dist.is_available() and dist.is_initialized():
            cand_keys, cand_labels, gate = _gather_from_all_ranks(cand_keys, cand_labels, gate)
        stats = {"candidates": float(scored.sum()), "written": float(len(cand_labels))}
        if len(cand_labels):
            self._store(cand_keys, value_codes[cand_labels], rate * gate)
            self.writes += len(cand_labels)
        return stats

    def _store(self, keys: torch.Tensor, values: torch.Tensor, mass: torch.Tensor) -> None:
        """Add (key, value, mass) rows: into matching slots as mass-weighted means, else into new slots."""
        # Rows with the same key (the same cue and offset) are one write: merge them first.
        unique_keys, group = torch.unique(keys, dim=0, return_inverse=True)
        group_mass = torch.zeros(len(unique_keys), device=keys.device).index_add_(0, group, mass)
        group_values = torch.zeros(len(unique_keys), values.shape[1], device=keys.device).index_add_(
            0, group, values * mass.unsqueeze(1)) / group_mass.unsqueeze(1)
        occupied = self.occupied
        similarity = unique_keys @ self.slot_keys.t()
        similarity[:, ~occupied] = -2.0
        best_similarity, best_slot = similarity.max(dim=1)
        matched = best_similarity >= self.match_threshold
        target = best_slot.clone()
        new_rows = (~matched).nonzero().squeeze(1)
        if len(new_rows):
            # Free slots first (lowest index), then the weakest occupied ones that no matched row updates.
            protected = torch.zeros_like(occupied)
            protected[best_slot[matched]] = True
            preference = torch.where(occupied, self.slot_mass, torch.full_like(self.slot_mass, -1.0))
            preference[protected] = math.inf
            order = torch.sort(preference, stable=True).indices
            order = order[torch.isfinite(preference[order])][: len(new_rows)]
            # More new rows than available slots: the first ones are kept (unique_keys is sorted, not by surprise,
            # but write() already kept only the max_writes_per_step most surprising positions).
            new_rows = new_rows[: len(order)]
            target[new_rows] = order
            self.slot_mass[order] = 0.0
            self.slot_keys[order] = 0.0
            self.slot_values[order] = 0.0
        keep = matched.clone()
        keep[new_rows] = True
        rows, slots = keep.nonzero().squeeze(1), target[keep]
        old_mass = self.slot_mass[slots]
        new_mass = old_mass + group_mass[rows]
        weight_old, weight_new = (old_mass / new_mass).unsqueeze(1), (group_mass[rows] / new_mass).unsqueeze(1)
        self.slot_values[slots] = weight_old * self.slot_values[slots] + weight_new * group_values[rows]
        self.slot_keys[slots] = F.normalize(weight_old * self.slot_keys[slots] + weight_new * unique_keys[rows], dim=-1)
        self.slot_mass[slots] = new_mass

    @torch.no_grad()
    def decay(self, factor: float) -> None:
        """Every slot's mass times (1 - ``factor``): old memories fade unless rewritten."""
        if factor > 0:
            self.slot_mass.mul_(1.0 - factor)

    @torch.no_grad()
    def consolidate(self) -> dict[str, float]:
        """Free slots whose mass fell below ``min_mass``; merge each slot into an earlier one whose key it
        matches (cos >= ``merge_threshold``), mass-weighted. Returns counts for logging."""
        weak = self.occupied & (self.slot_mass < self.min_mass)
        self._free(weak)
        occupied = self.occupied
        merged = 0
        if int(occupied.sum()) > 1:
            index = occupied.nonzero().squeeze(1)
            similarity = self.slot_keys[index] @ self.slot_keys[index].t()
            similarity = similarity.tril(diagonal=-1)  # each slot looks only at earlier slots
            best, into = similarity.max(dim=1)
            sources = (best >= self.merge_threshold).nonzero().squeeze(1)
            targets = into[sources]
            # A slot that is itself merged away cannot receive: keep those pairs for the next consolidation.
            receiving = ~torch.isin(targets, sources)
            sources, targets = index[sources[receiving]], index[targets[receiving]]
            if len(sources):
                mass = self.slot_mass[sources].unsqueeze(1)
                value_sums = self.slot_values * self.slot_mass.unsqueeze(1)
                key_sums = self.slot_keys * self.slot_mass.unsqueeze(1)
                value_sums.index_add_(0, targets, self.slot_values[sources] * mass)
                key_sums.index_add_(0, targets, self.slot_keys[sources] * mass)
                new_mass = self.slot_mass.clone().index_add_(0, targets, mass.squeeze(1))
                self.slot_values[targets] = value_sums[targets] / new_mass[targets].unsqueeze(1)
                self.slot_keys[targets] = F.normalize(key_sums[targets], dim=-1)
                self.slot_mass[targets] = new_mass[targets]
                self._free(torch.zeros_like(occupied).index_fill_(0, sources, True))
                merged = len(sources)
        return {"freed": float(weak.sum()), "merged": float(merged)}

    def _free(self, which: torch.Tensor) -> None:
        self.slot_mass[which] = 0.0
        self.slot_keys[which] = 0.0
        self.slot_values[which] = 0.0


def _gather_from_all_ranks(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    gathered: list[tuple[torch.Tensor, ...] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tuple(t.cpu() for t in tensors))
    device = tensors[0].device
    return tuple(torch.cat([g[i] for g in gathered if g is not None]).to(device) for i in range(len(tensors)))
