"""The data pipeline of a preference run (``preference:`` in the recipe): sources -> preference records ->
tokenized pairs (or KTO's labelled completions) -> over-length handling -> eval split, mixture, shuffle.

Same steps, seeds and :class:`~peftlab.data.build.DataBundle` as the SFT pipeline (:mod:`peftlab.data.build`);
what differs is the record (:mod:`peftlab.data.preference_rows`) and that nothing is packed. Over-length counts are
reported: pairs cut (their prompts from the left, then their answers) and dropped.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any

from peftlab.data.build import (
    DataBundle,
    SourceRecord,
    draw_train,
    pad_token_id_for,
    sample_id,
    split_eval,
    unique_names,
)
from peftlab.data.config import DataConfig, DatasetSpec
from peftlab.data.formats import BadRow, row_weight
from peftlab.data.preference_rows import (
    PreferenceEncoder,
    example_length,
    example_of,
    fit_pair,
    preference_records,
)
from peftlab.data.sources import Source, UnreadableRow
from peftlab.data.stats import DatasetStats, DataStats, padding_waste
from peftlab.data.tokenize import IGNORE_INDEX, Encoder
from peftlab.errors import PeftlabError

logger = logging.getLogger(__name__)


def prompt_budget(cfg: DataConfig) -> int:
    """Tokens a prompt may keep when a pair is too long: ``preference.max_prompt_len``, else half of
    ``data.max_seq_len`` (TRL's defaults: 512 of 1024)."""
    pref = cfg.preference or {}
    return int(pref.get("max_prompt_len") or max(1, cfg.max_seq_len // 2))


def _records(source: Source, spec: DatasetSpec, name: str, cfg: DataConfig, st: DatasetStats, key: str,
             mode: str) -> Iterator[list[SourceRecord]]:
    """The records of each row (a pair row read for KTO gives two, which stay together in the eval split)."""
    for row in source:
        st.rows += 1
        try:
            if isinstance(row.data, UnreadableRow):
                raise BadRow("<row>", f"unreadable: {row.data.problem} ({row.data.fix})")
            if not isinstance(row.data, dict):
                raise BadRow("<row>", f"expected an object, got {type(row.data).__name__}")
            weight = row_weight(row.data, spec.fields)
            recs = preference_records(row.data, spec.fields, mode)
        except BadRow as e:
            if cfg.on_bad_rows == "skip":
                st.bad_rows += 1
                continue
            raise PeftlabError(
                f"{row.where}: bad row in dataset {name!r} ({key}, preference data): field {e.field!r} {e.expected}. "
                "Fix the row, or set data.on_bad_rows: skip to leave such rows out (they are counted).") from None
        for rec in recs:
            if weight != 1.0:
                rec["weight"] = weight
        yield [SourceRecord(row.index, row.where, rec, "preference") for rec in recs]
        if cfg.max_samples is not None and st.rows >= cfg.max_samples:
            break


def _flat(groups: Iterable[list[SourceRecord]]) -> list[SourceRecord]:
    return [it for group in groups for it in group]


def _encode(items: list[SourceRecord], encoder: PreferenceEncoder, cfg: DataConfig, ds_index: int,
            spec: DatasetSpec, name: str, st: DatasetStats, key: str, prompts_cut: list[int]) -> list[dict[str, Any]]:
    out = []
    budget = prompt_budget(cfg)
    for it in items:
        try:
            enc = encoder.encode(it.record)
        except BadRow as e:
            if cfg.on_bad_rows == "skip":
                st.bad_rows += 1
                continue
            raise PeftlabError(f"{it.where}: bad row in dataset {name!r} ({key}, preference data): field "
                               f"{e.field!r} {e.expected}. Fix the row, or set data.on_bad_rows: skip.") from None
        st.longest = max(st.longest, len(enc.prompt_ids) + max(len(a.ids) for a in enc.answers))
        fitted = fit_pair(enc, cfg.max_seq_len, budget, cfg.overlength, encoder.enc.bos_id)
        if not fitted.kept:
            st.dropped += 1
            continue
        if fitted.prompt_cut or fitted.answer_cut:
            st.truncated += 1
            prompts_cut[0] += bool(fitted.prompt_cut)
        ex = example_of(enc)
        ex.update(sample_id=sample_id(ds_index, it.row), dataset=ds_index,
                  loss_weight=float(spec.loss_weight) * float(it.record.get("weight", 1.0)))
        st.samples += 1
        st.tokens += example_length(ex)
        st.trained_tokens += answer_tokens(ex)
        out.append(ex)
    return out


def build_preference_bundle(cfg: DataConfig, tokenizer: Any, *, seed: int, train_sources: list[Source],
                            eval_sources: list[Source]) -> DataBundle:
    """The preference pipeline (see the module docstring); ``cfg.preference["mode"]`` is ``pairs`` or
    ``unpaired`` (KTO)."""
    mode = (cfg.preference or {}).get("mode", "pairs")
    names = unique_names([*cfg.train, *cfg.eval])
    encoder = PreferenceEncoder(Encoder(tokenizer, template=cfg.template, system_prompt=cfg.system_prompt))
    stats = DataStats(max_seq_len=cfg.max_seq_len)
    parts: list[list[dict[str, Any]]] = []
    eval_examples: list[dict[str, Any]] = []
    prompts_cut = [0]  # over-length records whose prompt was cut (reported with the counts)
    for i, (spec, src) in enumerate(zip(cfg.train, train_sources)):
        key, st = f"data.train[{i}]", DatasetStats(names[i])
        items = list(_records(src, spec, names[i], cfg, st, key, mode))
        if not items:
            raise PeftlabError(f"{key}: dataset {names[i]!r} ({spec.path}) has no usable preference rows "
                               f"({st.rows} rows, {st.bad_rows} bad)")
        train_items, held = split_eval(items, cfg.eval_split if not cfg.eval else 0.0,
                                       random.Random(f"eval-split:{seed}:{i}"))
        parts.append(_encode(_flat(train_items), encoder, cfg, i, spec, names[i], st, key, prompts_cut))
        if not parts[-1]:
            raise PeftlabError(f"{key} ({spec.path}): no training pairs left after over-length handling "
                               f"({st.dropped} dropped, the longest has {st.longest} tokens); raise "
                               "data.max_seq_len or set data.overlength: truncate")
        stats.datasets.append(st)
        if held:
            est = DatasetStats(names[i], split="eval", rows=len(held))
            eval_examples += _encode(_flat(held), encoder, cfg, i, spec, names[i], est, key, prompts_cut)
            stats.datasets.append(est)
    for j, (spec, src) in enumerate(zip(cfg.eval, eval_sources)):
        i = len(cfg.train) + j
        key, est = f"data.eval[{j}]", DatasetStats(names[i], split="eval")
        eval_examples += _encode(_flat(_records(src, spec, names[i], cfg, est, key, mode)), encoder, cfg, i, spec,
                                 names[i], est, key, prompts_cut)
        stats.datasets.append(est)

    train = draw_train(parts, cfg, stats, seed)
    lengths = [example_length(e) for e in train]
    stats.train_samples, stats.train_tokens, stats.eval_samples = len(train), sum(lengths), len(eval_examples)
    stats.train_trained_tokens = sum(d.trained_tokens for d in stats.datasets if d.split == "train")
    stats.padding_waste_fixed = 1.0 - stats.train_tokens / (len(train) * cfg.max_seq_len)
    stats.padding_waste_dynamic = padding_waste(lengths, stats.padding_batch_size)
    cut = sum(d.truncated for d in stats.datasets)
    if cut or stats.dropped:
        logger.info(f"preference data: {cut} over-length {'pairs' if mode == 'pairs' else 'completions'} cut to "
                    f"data.max_seq_len={cfg.max_seq_len} ({prompts_cut[0]} of them with the prompt cut from the left to "
                    f"{prompt_budget(cfg)} tokens, the answers after), {stats.dropped} dropped")
    prompts_for_eval = [{"prompt_ids": e["prompt_ids"], "reference": _reference(tokenizer, e),
                         "dataset": names[e["dataset"]]}
                        for e in eval_examples if "chosen_ids" in e or e.get("desirable")][:cfg.eval_prompts]
    return DataBundle(train=train, eval=eval_examples or None, eval_prompts=prompts_for_eval, stats=stats,
                      dataset_names=names, pad_token_id=pad_token_id_for(tokenizer))


def _reference(tokenizer: Any, ex: dict[str, Any]) -> str:
    """The preferred answer's text (its trained tokens): what a greedy answer is compared with."""
    ids, labels = (ex["chosen_ids"], ex["chosen_labels"]) if "chosen_ids" in ex else \
        (ex["completion_ids"], ex["completion_labels"])
    return tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX], skip_special_tokens=True)


def answer_tokens(example: dict[str, Any]) -> int:
    """Answer tokens of one pair (chosen + rejected) or KTO completion that the loss scores, as the run's
    ``tokens_seen`` counts them (labels after the shift): with an empty prompt (no BOS) an answer's first token is
    the row's first token, which nothing predicts."""
    skip = 0 if example["prompt_ids"] else 1
    return sum(sum(1 for x in example[k][skip:] if x != IGNORE_INDEX)
               for k in ("chosen_labels", "rejected_labels", "completion_labels") if k in example)
