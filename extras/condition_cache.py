"""
The condition cache (OminiControl2 / EasyControl): a model trained so that the Kontext condition tokens get the
modulation of t = 0 and attend only to themselves. Then their keys and values in every block do not depend on x_t
or t, so sampling computes them once per image and each step runs the text and x_t tokens alone:

    Kontext:          each step  cat(txt, x_t, x_cond) [B, 512 + 2048, D] through 57 blocks
    condition cache:  once       x_cond [B, 1024, D] alone at t = 0, no text -> its K/V per block [B, 24, 1024, 128]
                      each step  cat(txt, x_t) [B, 512 + 1024, D]; every query attends to [txt, x_t | cached x_cond]

This is another model than Kontext's (train.py --condition-cache; the run config records it). It plugs into the
core through flux_model.Extra.keys_values: the condition pass records each block's keys and values, the step pass
appends them. ConditionCache wraps a Flux as DDP does: it takes Flux.forward's arguments (img = cat(x_t, x_cond))
and returns the velocity of the x_t tokens. Made with keep=True for one sampling run, it keeps its last two condition
passes (without gradients: semantic guidance alternates a pass with and one without the semantic input) and reuses
one while its condition inputs are equal: every step of that run. (Only for one run: a kept pass does not know when
the weights change.)
"""

import torch
from torch import Tensor, nn

from flux_model import Extra, Flux


def condition_tokens(img_ids: Tensor) -> int:
    """How many Kontext condition tokens (first id axis 1) end the image sequence: img_ids [B, L_img, 3] -> L_c."""
    marked = img_ids[0, :, 0] != 0  # [L_img]
    L_c = int(marked.sum())
    if L_c == 0 or not bool(marked[-L_c:].all()):
        raise ValueError("the condition cache needs Kontext's image sequence cat(x_t, x_cond), the condition tokens "
                         "last with their ids' first axis 1 (flow.kontext_ids)")
    return L_c


class Passing(Extra):
    """Hands every point but keys_values to the semantic input's Extra (or changes nothing without one)."""

    def __init__(self, inner: Extra | None):
        self.inner = inner or Extra()

    def image_attention(self, name: str, q: Tensor) -> Tensor | None:
        return self.inner.image_attention(name, q)

    def after_block(self, name: str, img: Tensor) -> Tensor:
        return self.inner.after_block(name, img)


class Record(Passing):
    """The condition pass: keeps each block's rotated keys and values [B, H, L_c, Dh]."""

    def __init__(self, inner: Extra | None):
        super().__init__(inner)
        self.kv: dict[str, tuple[Tensor, Tensor]] = {}

    def on_input(self, img: Tensor) -> Tensor:
        return self.inner.on_input(img)  # scheme A adds to the condition tokens, which this pass runs

    def keys_values(self, name: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.kv[name] = (k, v)
        return k, v


class Cached(Passing):
    """A step: the text and x_t tokens also attend to the recorded condition keys and values."""

    def __init__(self, inner: Extra | None, kv: dict[str, tuple[Tensor, Tensor]]):
        super().__init__(inner)
        self.kv = kv

    def keys_values(self, name: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k_c, v_c = self.kv[name]
        return torch.cat((k, k_c), dim=2), torch.cat((v, v_c), dim=2)  # [B, H, L + L_c, Dh]


class ConditionCache(nn.Module):
    """A Flux run as the condition cache: forward(img = cat(x_t, x_cond), ...) -> velocity [B, L_x, 64]."""

    def __init__(self, model: Flux, keep: bool = False):
        super().__init__()
        self.model = model
        self.keep = keep  # reuse a condition pass while its inputs are equal (one sampling run)
        self._kept = []  # (condition inputs, recorded keys and values) of the last two condition passes

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None, semantic: Tensor | None = None,
                semantic_ids: Tensor | None = None, semantic_strength: float | Tensor = 1.0) -> Tensor:
        L_c = condition_tokens(img_ids)
        x, x_cond = img[:, :-L_c], img[:, -L_c:]  # [B, L_x, 64], [B, L_c, 64]
        x_ids, cond_ids = img_ids[:, :-L_c], img_ids[:, -L_c:]
        if semantic is not None:  # the semantic tokens sit on the target grid (0, row, col), in both passes
            if self.model.semantic is None:
                raise ValueError("semantic tokens were given but no semantic module is attached "
                                 "(see sem_cross_attn.attach)")
            if semantic_ids is None:  # packed latents [B, N, 64], or pixels [B, 3, H, W] on the /16 token grid
                N = semantic.shape[1] if semantic.ndim == 3 else (semantic.shape[-2] // 16) * (semantic.shape[-1] // 16)
                semantic_ids = x_ids[:, :N]
        sem = lambda ids: (None if semantic is None else  # noqa: E731
                           self.model.semantic.prepare(semantic, semantic_ids, ids, semantic_strength))
        kv = self.condition_pass(x_cond, cond_ids, txt, txt_ids, y, guidance, semantic, semantic_strength, sem)
        return self.model(x, x_ids, txt, txt_ids, timesteps, y, guidance, extra=Cached(sem(x_ids), kv))

    def condition_pass(self, x_cond, cond_ids, txt, txt_ids, y, guidance, semantic, strength, sem) -> dict:
        """x_cond alone through the blocks at t = 0 with no text: every block's keys and values."""
        key = (x_cond, cond_ids, y, guidance, semantic, strength)
        keep = self.keep and not torch.is_grad_enabled()
        for kept_key, kv in self._kept if keep else ():
            if _equal(kept_key, key):
                return kv
        record = Record(sem(cond_ids))
        t0 = torch.zeros(x_cond.shape[0], device=x_cond.device, dtype=x_cond.dtype)
        self.model(x_cond, cond_ids, txt[:, :0], txt_ids[:, :0], t0, y, guidance, extra=record)
        if keep:
            self._kept = [*self._kept[-1:], (key, record.kv)]
        return record.kv


def _equal(a: tuple, b: tuple) -> bool:
    """Equal condition inputs (tensors by value, numbers by value, None with None)."""
    def same(x, y):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            return (isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape
                    and x.device == y.device and bool(torch.equal(x, y)))
        return x == y
    return all(same(x, y) for x, y in zip(a, b))
