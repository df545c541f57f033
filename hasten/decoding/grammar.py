"""Structured output: a grammar (a JSON schema, any JSON object, a regex or a Lark grammar) that every emitted
token must keep valid, through llguidance's matcher.

Under speculation the grammar acts twice. Before verification, draft nodes the grammar forbids are pruned (with
their subtrees): they could never be accepted. During verification, the target's logits of every scored row are
masked to the tokens the grammar allows after that row's prefix, so the verifier — greedy or exact speculative
sampling — chooses from the constrained target distribution p. A method is then exactly as lossless under a
grammar as without one: every row's mask depends only on its own prefix, which is the same whatever was drafted,
so the output equals constrained plain decoding (greedy), or follows its distribution (sampling).
"""
from __future__ import annotations

import json

import numpy as np
import torch

from .tree import Draft


class GrammarError(ValueError):
    pass


def compile_grammar(response_format: dict) -> str:
    """An OpenAI `response_format` → llguidance's grammar text. {"type": "json_object"} (any JSON object),
    {"type": "json_schema", "json_schema": {"schema": {...}}}, and hasten's own {"type": "regex", "regex": ...},
    {"type": "lark", "lark": ...}; anything else is a GrammarError naming what is accepted."""
    import llguidance
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    try:
        grammar = None
        if kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise GrammarError("response_format.json_schema.schema: required (a JSON schema object)")
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        elif kind == "regex" and isinstance(response_format.get("regex"), str):
            grammar = llguidance.LLMatcher.grammar_from_regex(response_format["regex"])
        elif kind == "lark" and isinstance(response_format.get("lark"), str):
            grammar = llguidance.LLMatcher.grammar_from_lark(response_format["lark"])
        problem = llguidance.LLMatcher.validate_grammar(grammar) if grammar is not None else None
    except GrammarError:
        raise
    except Exception as e:  # llguidance's own message says what is wrong with the schema/grammar
        problem = str(e) or type(e).__name__
    if problem:
        raise GrammarError(f"response_format: {' '.join(problem.split())[:240]}")  # one line, however long
    if grammar is None:
        raise GrammarError("response_format: must be {'type': 'json_object'}, {'type': 'json_schema', 'json_schema': "
                           "{'schema': ...}}, {'type': 'regex', 'regex': ...} or {'type': 'lark', 'lark': ...}")
    return grammar


class Grammar:
    """One sequence's grammar state: the tokens it allows next, and the pruning/masking of a step's draft tree.
    `tokenizer`: llguidance's LLTokenizer for the model (Engine builds one and keeps it)."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int):
        import llguidance
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise GrammarError(f"response_format: {self.matcher.get_error()}")
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows after what was consumed (padded with False past the
        tokenizer's vocabulary)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        out = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, bits.shape[0])
        out[:n] = torch.from_numpy(bits[:n].astype(bool))
        return out

    def prune(self, draft: Draft) -> Draft:
        """The draft without the nodes the grammar forbids, and their subtrees."""
        keep = self._walk(draft, None)
        if len(keep) == len(draft):
            return draft
        where = {old: new for new, old in enumerate(keep)}
        parents = [where[draft.parents[i]] if draft.parents[i] >= 0 else -1 for i in keep]
        q = draft.q[keep] if draft.q is not None and keep else None
        sources = [draft.sources[i] for i in keep] if draft.sources else None
        return Draft([draft.tokens[i] for i in keep], parents, q, sources)

    def masks(self, draft: Draft) -> torch.Tensor:
        """[1+n, V] bool for a draft of allowed nodes (pruned): the root row's and each node's row's allowed
        tokens, after that row's prefix."""
        rows = [self.allowed()]
        if len(self._walk(draft, rows)) != len(draft):
            raise GrammarError("the draft holds tokens the grammar forbids; prune it first")
        return torch.stack(rows)

    def _walk(self, draft: Draft, rows: list | None) -> list[int]:
        """Indices of the nodes whose path from the root the grammar allows (topological order), appending each
        one's mask to `rows` when given. The matcher ends where it began."""
        keep: list[int] = []
        paths: dict[int, list[int]] = {-1: []}  # allowed node → its tokens from the root down
        for i, (tok, parent) in enumerate(zip(draft.tokens, draft.parents)):
            if parent not in paths:  # under a forbidden node
                continue
            path = paths[parent] + [tok]
            if self.matcher.validate_tokens(path) < len(path):
                continue
            if rows is not None:
                self.matcher.consume_tokens(path)
                rows.append(self.allowed())
                self.matcher.rollback(len(path))
            paths[i] = path
            keep.append(i)
        return keep

    def commit(self, tokens: list[int]) -> None:
        """The emitted tokens, in order (all allowed: they were chosen from masked logits). End of sequence is
        allowed once the match is complete; the matcher then stops and takes nothing more."""
        for t in tokens:
            if self.matcher.is_stopped():  # complete: only end of sequence was allowed, and it ends the output
                return
            if not self.matcher.consume_token(t):
                raise GrammarError(f"the grammar refused emitted token {t}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar accepts no more tokens (its match is complete)."""
        return self.matcher.is_stopped()


def constrain(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """logits [R, V] with every token a row's mask [R, V] forbids set to -inf."""
    return logits.masked_fill(~masks.to(logits.device), float("-inf"))
