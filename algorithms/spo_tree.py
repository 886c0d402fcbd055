"""SPO-tree (Guo et al. 2025, "Segment Policy Optimization", arXiv 2505.23564): responses are sampled as a tree of
fixed-length segments, so the samples that value a segment are the ones trained on: no Monte-Carlo rollout is
discarded.

Sampling (``sample``, this strategy owns the shape of its batch): from each prompt, ``branch_factors[0]``
segments of ``segment_tokens`` tokens; from the end of each, ``branch_factors[1]`` more; ...; the last level
runs to the end of the response budget. A segment that ends the response (EOS, a stop string, or the budget) is
a leaf. Every leaf is one row of the batch: its full response, graded as usual.

Credit: a leaf's value is its reward; an internal node's is the mean of its children's values (as the
reference's tree); every token of the segment from node u to its child c gets A = V(c) - V(u), and
``Credit.values`` carries V(u) (the state the segment starts from). The root is the prompt, valued by its tree.

Training set (``Credit.loss_mask``): each segment once — on the first leaf below it — and only the segments whose
advantage is not 0, as the reference trains on its tree's edges (``only_adv_greater_than_zero``: edges with
advantage 0 are dropped). Rows share their prefix segments; the mask keeps a shared segment from being trained
once per leaf below it.

Simplifies relative to the paper and its code (AIFrameResearch/SPO): no replay buffer; no PAV / best-of-K prover
term; the tree is sampled level by level in one engine call per level; ``group_size`` is the most leaves a prompt
can have (the product of the branch factors), a prompt whose segments end early has fewer rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import gin
import torch

from rlzoo import distributed
from rlzoo.algorithms import ESTIMATORS, Credit, Estimator
from rlzoo.engine import Completion, context_length
from rlzoo.seeds import Salt, derive_seed
from rlzoo.tasks import encode_prompts


@ESTIMATORS.register("spo_tree")
@gin.configurable("spo_tree")
@dataclass
class SPOTree(Estimator):
    branch_factors: tuple = (6, 6, 6)  # children of each node, level by level (the paper: 6-6-6)
    segment_tokens: int = 30  # tokens per segment before the last level (the paper's GSM8K setting: M = 30)
    ranges = {**Estimator.ranges, "segment_tokens": ">= 1"}

    def __post_init__(self) -> None:
        from rlzoo.errors import UserError

        super().__post_init__()
        if not self.branch_factors or any(not isinstance(b, int) or b < 1 for b in self.branch_factors):
            raise UserError(f"spo_tree.branch_factors = {self.branch_factors!r}; expected a tuple of integers >= 1, e.g. (6, 6, 6)")

    @property
    def group_size(self) -> int:  # the most leaves (rows) one prompt can have
        return math.prod(self.branch_factors)

    def sample(self, problems, ctx):
        """Trees of segments for this rank's prompts (level by level), graded at their leaves, gathered whole.

        As ``rollout.sample_groups``: prompts by ``encode_prompts`` (``ctx.prompt_tokenization``), each response
        within its budget (``max_new_tokens``, less where the model's context is shorter), so every segment gets what
        is left of it (``remaining_budgets``): a node that has used it up is a leaf. Level 0 draws the rollouts' noise
        (seed, prompt index) as the default sampling does; level d >= 1 its own (``Salt.TREE_LEVEL``), each node keyed
        by its index among all processes' open nodes, so the tree does not depend on the number of processes."""
        from rlzoo.rollout import build_batch, remaining_budgets

        tokenizer, task, M = ctx.tokenizer, ctx.task, self.segment_tokens
        prompt_ids = encode_prompts(tokenizer, task, problems, ctx.prompt_tokenization)
        context = context_length(ctx.policy) if ctx.policy is not None else None
        max_new = ctx.sampling.max_new_tokens
        response_budget = remaining_budgets(prompt_ids, list(map(len, prompt_ids)), max_new, context)  # [P]
        mine = distributed.shard(len(problems))
        leaves: list[list[tuple[tuple, Completion]]] = [[] for _ in mine]  # per prompt: (path, leaf completion)
        frontier = [((p,), [], []) for p in range(len(mine))]  # open nodes: (path, response tokens so far, their log-probs)
        generated = 0
        with ctx.watch("generation"), ctx.sampling_weights():
            for depth, branch in enumerate(self.branch_factors):
                # ranks meet: every rank's open nodes, so that each node draws the keys one process would give it
                sizes = distributed.gather_objects(len(frontier))
                if not sum(sizes):
                    break
                last = depth == len(self.branch_factors) - 1
                states = [prompt_ids[mine.start + path[0]] + prefix for path, prefix, _ in frontier]
                left = [response_budget[mine.start + path[0]] - len(prefix) for path, prefix, _ in frontier]  # >= 1: open nodes
                budgets = left if last else [min(M, b) for b in left]
                seed = ctx.sampling.seed if depth == 0 else derive_seed(ctx.sampling.seed, depth, Salt.TREE_LEVEL)
                first = mine.start if depth == 0 else sum(sizes[: distributed.rank()])
                params = replace(ctx.sampling, n=branch, seed=seed, first_index=first)  # each node's budget: budgets
                out = ctx.engine.generate(states, params, budgets=budgets) if states else []
                nxt = []
                for (path, prefix, prefix_logprobs), group, budget in zip(frontier, out, left):
                    for j, c in enumerate(group):
                        generated += len(c.token_ids)
                        tokens = prefix + c.token_ids
                        logprobs = None if c.logprobs is None or prefix_logprobs is None else prefix_logprobs + c.logprobs
                        if last or c.finish_reason == "stop" or len(c.token_ids) >= budget:  # a leaf: the response ends here
                            text = self._text(tokenizer, task, tokens, c)
                            leaves[path[0]].append((path + (j,), Completion(tokens, text, c.finish_reason, logprobs)))
                        else:
                            nxt.append((path + (j,), tokens, logprobs))
                frontier = nxt
        with ctx.watch("reward"):
            for group in leaves:
                group.sort(key=lambda leaf: leaf[0])  # rows in tree order: siblings adjacent
            completions = [[c for _, c in group] for group in leaves]  # [P_rank][leaves]
            paths = [[(mine.start + path[0],) + path[1:] for path, _ in group] for group in leaves]
            flat_problems = [problems[mine.start + p] for p, group in enumerate(completions) for _ in group]
            scores = task.score(flat_problems, [c.text for group in completions for c in group])
            parts = distributed.gather_objects((completions, scores, paths, generated))  # ranks meet: the whole batch
            completions = [g for part in parts for g in part[0]]  # [P][leaves]
            scores = [s for part in parts for s in part[1]]
            batch = build_batch(tokenizer, task, problems, prompt_ids, completions, scores)
        batch.extra["tree_paths"] = [path for part in parts for group in part[2] for path in group]  # [B]: node path of each leaf
        ctx.tokens["policy"] += sum(part[3] for part in parts)  # tokens generated: shared segments once
        return batch

    @staticmethod
    def _text(tokenizer, task, tokens: list[int], last: Completion) -> str:
        """A leaf's response text: all its tokens decoded together (a segment decoded alone may lose a word's leading
        space), cut at the first stop string as the engine cuts it; a root-level leaf keeps the engine's text."""
        if len(tokens) == len(last.token_ids):
            return last.text
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in (task.stop or ())) if i >= 0), default=-1)
        return text[:cut] if cut >= 0 else text

    def node_values(self, paths: list[tuple], scores: list[float]) -> dict[tuple, float]:
        """V of every node of the batch's trees: a leaf's reward; an internal node's mean of its children's values."""
        values = dict(zip(paths, scores))
        children: dict[tuple, set] = {}
        for path in paths:
            for d in range(1, len(path)):
                children.setdefault(path[:d], set()).add(path[: d + 1])
        for node in sorted(children, key=len, reverse=True):  # deepest first: children are valued before parents
            values[node] = sum(values[c] for c in children[node]) / len(children[node])
        return values

    def advantages(self, batch, ctx) -> Credit:
        paths = batch.extra.get("tree_paths")
        if paths is None:  # a batch sampled elsewhere (e.g. the audit's groups): each row its own chain, one segment per level
            paths = [(int(g), b) for b, g in enumerate(batch.group_ids.tolist())]
        scores = batch.token_rewards.sum(-1).tolist()  # [B]
        values = self.node_values(paths, scores)
        advantages = torch.zeros_like(batch.response_mask)  # [B, L]
        token_values = torch.zeros_like(batch.response_mask)  # [B, L]: V of the node each segment starts from
        loss_mask = torch.zeros_like(batch.response_mask)  # [B, L]: each nonzero-advantage segment once
        trained = set()
        last = batch.last_token_index().tolist()
        edges = nonzero = 0
        for b, path in enumerate(paths):
            start = int(batch.prompt_lens[b])
            for d in range(1, len(path)):
                s = start + (d - 1) * self.segment_tokens
                e = last[b] + 1 if d == len(path) - 1 else min(s + self.segment_tokens, last[b] + 1)
                a = values[path[: d + 1]] - values[path[:d]]
                advantages[b, s:e] = a
                token_values[b, s:e] = values[path[:d]]
                if path[: d + 1] not in trained:
                    trained.add(path[: d + 1])
                    edges += 1
                    if a != 0:
                        nonzero += 1
                        loss_mask[b, s:e] = 1.0
        mask = batch.response_mask
        return Credit(advantages=advantages * mask, values=token_values * mask, loss_mask=loss_mask * mask,
                      stats={"tree_edges": edges, "tree_edges_trained": nonzero, "tree_leaves": len(paths),
                             "tree_root_value_mean": sum(values[p[:1]] for p in paths) / max(len(paths), 1)})
