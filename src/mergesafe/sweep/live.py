"""In-memory merging into one live model: no checkpoint is written per sweep point.

Pre and post weights are read once (float32, CPU); each trial computes every parameter with the
merge engine's own `merge_tensor` (the function the streamed `mergesafe merge` uses, so a sweep
point equals the merged checkpoint) and copies it into the live model's parameter in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergesafe.checkpoint.inputs import open_model, open_model_or_adapter
from mergesafe.errors import UserError
from mergesafe.merge.engine import merge_pair, pair_plan


@dataclass
class LiveInputs:
    """The opened (validated, not yet read) checkpoints of a sweep: pre, posts, anchor."""

    pre: Any
    posts: list[Any]
    anchor: Any = None


class LiveMerge:
    """Holds θ_pre, θ_post (one or several) and a live model; `apply` writes a merge into it."""

    @staticmethod
    def open_inputs(pre: Path, posts: list[Path], *, anchor: Path | None = None,
                    allow_pickle: bool = False) -> LiveInputs:
        """Open and validate every input (headers, adapters, configs) before any work."""
        pre_ckpt = open_model(pre, "--pre", allow_pickle)
        return LiveInputs(pre_ckpt,
                          [open_model_or_adapter(p, pre_ckpt, "--post", allow_pickle) for p in posts],
                          open_model(anchor, "--anchor", allow_pickle) if anchor else None)

    def __init__(self, model: nn.Module, inputs: LiveInputs) -> None:
        self.model = model
        self.params: dict[str, nn.Parameter] = dict(model.named_parameters())
        self.state = MergeState(inputs, list(self.params))
        self.pre, self.posts, self.anchor = self.state.pre, self.state.posts, self.state.anchor
        self._grow_vocabulary()

    def _grow_vocabulary(self) -> None:
        """When post added tokens, the live model gets post's vocabulary size (new rows from post)."""
        emb = self.model.get_input_embeddings()
        rows = max(store[n].shape[0] for store in self.posts for n in store if n.endswith("embed_tokens.weight"))
        if rows > emb.weight.shape[0]:
            self.model.resize_token_embeddings(rows)
            self.params = dict(self.model.named_parameters())

    @torch.no_grad()
    def apply(self, method: str, weight: float, params: dict[str, Any], seed: int,
              post: int | None = None) -> None:
        """Write the merge (method, λ = weight) of pre and the posts into the live model.

        `method` "pre" and "post" are λ = 0 and λ = 1 of `linear` (with several posts, "post" is
        their average).  Every other method goes through the engine's plan, exactly as the
        streamed `mergesafe merge` does.  `post=i` merges pre with the i-th post alone (one
        fine-tuning seed of several).
        """
        shapes = {name: param.shape for name, param in self.params.items()}
        for name, merged in self.state.merged(method, weight, params, seed, post=post, shapes=shapes):
            param = self.params[name]
            if merged.shape != param.shape:
                raise UserError(f"merged tensor '{name}' has shape {tuple(merged.shape)}, the model "
                                f"expects {tuple(param.shape)}")
            param.copy_(merged.to(device=param.device, dtype=param.dtype))


class MergeState:
    """θ_pre, θ_post (one or several) and θ_anchor, float32 on the CPU, read once by tensor name;
    `merged` computes a merge tensor by tensor, with no model (the vLLM sweep hands the pairs to
    its engine, :mod:`mergesafe.sweep.vllm_worker`; :class:`LiveMerge` copies them into its model)."""

    def __init__(self, inputs: LiveInputs, names: list[str]) -> None:
        pre_ckpt, post_ckpts, anchor_ckpt = inputs.pre, inputs.posts, inputs.anchor
        have = set(pre_ckpt.names())
        self.names = list(names)
        self.pre: dict[str, torch.Tensor] = {}
        self.posts: list[dict[str, torch.Tensor]] = [{} for _ in post_ckpts]
        self.anchor: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}  # pre's stored dtype: `mergesafe merge` writes it
        for name in self.names:
            if name not in have:
                raise UserError(f"tensor '{name}' of the live model is not in the checkpoint",
                                path=pre_ckpt.dir)
            stored = pre_ckpt.get(name)
            self.dtypes[name] = stored.dtype
            self.pre[name] = stored.to(torch.float32)
            for store, ckpt in zip(self.posts, post_ckpts):
                store[name] = ckpt.get(name).to(torch.float32)
            if anchor_ckpt is not None:
                self.anchor[name] = anchor_ckpt.get(name).to(torch.float32)

    def merged(self, method: str, weight: float, params: dict[str, Any], seed: int, post: int | None = None,
               shapes: dict[str, torch.Size] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, float32 tensor) of the merge (method, λ = weight), in `names` order: see
        :meth:`LiveMerge.apply`.  `shapes`: the target's shapes (pre's tensor is taken as it is for
        "pre" where it has the target's shape; default: pre's own shapes)."""
        posts = self.posts if post is None else [self.posts[post]]
        n = len(posts)
        if method in ("pre", "post"):
            plan = pair_plan("linear", {}, [0.0 if method == "pre" else 1.0 / n] * n, n)
        else:
            plan = pair_plan(method, params, [weight / n] * n, n, bool(self.anchor))
        for name in self.names:
            if method == "pre" and (shapes is None or self.pre[name].shape == shapes[name]):
                yield name, self.pre[name]
            elif method == "post" and n == 1:
                yield name, posts[0][name]
            else:
                yield name, merge_pair(plan, name, self.pre[name], [store[name] for store in posts],
                                       seed, anchor=self.anchor.get(name))
