"""Full verification of a dataset (FORMAT.md §8 R12-R17, R19): checksums, bounds, sharing, token ids and splits,
vectorised in bounded chunks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import format as fmt
from ..errors import ChecksumError, FormatError
from .prompts import prompt_keys
from .shard import _open_shard, _Shard

__all__ = ["verify_dataset"]


def _tokens_max_visitor(sh: _Shard, path: Path) -> tuple[Any, list[int]]:
    """A file_checksum visitor computing the largest token id in the hashing pass (one read)."""
    dt = sh.tokens.dtype
    data_start = os.stat(path).st_size - int(sh.tokens.shape[0]) * dt.itemsize  # data ends the file (R8)
    hi = [-1]

    def visit(chunk: memoryview, off: int) -> None:
        # chunk offsets and data_start are multiples of 64: items stay aligned
        part = chunk[max(data_start - off, 0):]
        part = part[:len(part) - len(part) % dt.itemsize]
        if len(part):
            hi[0] = max(hi[0], int(np.frombuffer(part, dtype=dt).max()))

    return visit, hi


def _checksum_problems(root: Path, info: fmt.ShardInfo, i: int, sh: _Shard | None = None,
                       on_file: Callable[[int], None] | None = None) -> tuple[list[str], int | None]:
    """xxh3-128 of every file of a shard against the manifest (FORMAT.md §8 R12).

    With the mapped shard ``sh`` it also returns the largest token id, read in the same pass.
    ``on_file(nbytes)`` is called after each file (for progress).
    """
    out: list[str] = []
    hi: list[int] | None = None
    entries = {**info.files, **{f"columns.{k}": v for k, v in info.columns.items()}}
    for key, e in entries.items():
        fld = f"shards[{i}].{key}"
        try:
            p = fmt.resolve_file(root, e.path)
            fmt.regular_file_size(p, fld)  # never open a FIFO or device (R4)
            visit = None
            if key == "tokens" and sh is not None:
                visit, hi = _tokens_max_visitor(sh, p)
            got = fmt.file_checksum(p, visit)
        except FormatError as err:
            out.append(str(err))
            continue
        except OSError as err:
            out.append(str(FormatError(f"cannot read file ({err.strerror or err})", path=root / e.path,
                                       field=fld, section="§8 R4")))
            continue
        finally:
            if on_file is not None:
                on_file(e.bytes)
        if got != e.checksum:
            out.append(str(ChecksumError("checksum mismatch", path=p, field=fld, expected=e.checksum,
                                         actual=got, section="§8 R12")))
    return out, (hi[0] if hi is not None and hi[0] >= 0 else None)


def verify_dataset(path: str | os.PathLike, *, checksums: bool = True,
                   on_file: Callable[[int], None] | None = None) -> list[str]:
    """Every problem of the dataset at ``path`` as one message each; ``[]`` when it is sound.

    Unlike ``open(path).verify()`` this never raises for a damaged dataset: a manifest that
    cannot be read is one problem; a shard that cannot be opened is reported and the other
    shards (and that shard's checksums) are still checked (FORMAT.md §8). ``on_file(nbytes)`` is
    called after each shard file is hashed (for a progress bar).
    """
    root = Path(path)
    try:
        m = fmt.read_manifest(root)
    except FormatError as e:
        return [str(e)]
    problems: list[str] = []
    opened: list[_Shard] = []
    for i, s in enumerate(m.shards):
        try:
            sh: _Shard | None = _open_shard(root, m, i)
        except FormatError as e:
            problems.append(str(e))
            sh = None
        hi = None
        if checksums:
            more, hi = _checksum_problems(root, s, i, sh, on_file)
            problems += [p for p in more if p not in problems]
        if sh is not None:
            problems += _verify_shard(sh, i, m.vocab_size, tokens_max=hi)
            opened.append(sh)
    if checksums:
        problems += _tokenizer_file_problems(root, m)
    if m.splits:
        problems += _split_problems(root, m, opened if len(opened) == len(m.shards) else None, checksums)
    return problems


def _split_problems(root: Path, m: fmt.Manifest, shards: list[_Shard] | None, checksums: bool) -> list[str]:
    """The split files (FORMAT.md §4.5, §5.6): R4-R8 and R12 as for every file, then R19: indices
    strictly increasing in ``[0, num_pairs)``, no pair in two splits, ``num_prompts`` the distinct
    prompts (by token ids) of each split, and a split drawn ``by: "prompt"`` sharing no prompt with
    another split. ``shards``: every shard opened (None: one could not be, prompts are not compared)."""
    out: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    for s in m.splits:
        fld = f"splits.{s.name}"
        try:
            p = fmt.resolve_file(root, s.file.path)
            idx = fmt.open_array(p, fld, dtype=fmt.SPLIT_DTYPE, shape=(s.num_pairs,), expected_bytes=s.file.bytes)
            got = fmt.file_checksum(p) if checksums else s.file.checksum
            if got != s.file.checksum:  # reported; the indices are still checked below
                out.append(str(ChecksumError("checksum mismatch", path=p, field=fld, expected=s.file.checksum,
                                             actual=got, section="§8 R12")))
        except FormatError as e:
            out.append(str(e))
            continue
        except OSError as e:
            out.append(str(FormatError(f"cannot read file ({e.strerror or e})", path=root / s.file.path, field=fld,
                                       section="§8 R4")))
            continue
        if idx.size and (idx[0] < 0 or idx[-1] >= m.num_pairs or (np.diff(idx) <= 0).any()):
            out.append(str(FormatError(f"split indices must be strictly increasing pair indices in "
                                       f"[0, {m.num_pairs})", path=p, field=fld, section="§8 R19")))
            continue
        arrays[s.name] = np.asarray(idx)
    if len(arrays) > 1:
        every = np.sort(np.concatenate(list(arrays.values())))
        twice = every[1:][every[1:] == every[:-1]]
        if len(twice):
            out.append(str(FormatError(f"pair {int(twice[0])} is in two splits ({len(twice)} such pairs)",
                                       path=root / fmt.MANIFEST_NAME, field="splits", section="§8 R19")))
    if shards is None or not arrays:
        return out
    try:
        keys = prompt_keys(shards)
    except FormatError as e:  # a prompt outside its tokens: R13 reports it already
        return out + ([str(e)] if str(e) not in out else [])
    per = {name: np.unique(keys[idx]) for name, idx in arrays.items()}
    for s in m.splits:
        if s.name not in per:
            continue
        if len(per[s.name]) != s.num_prompts:
            out.append(str(FormatError("num_prompts differs from the distinct prompts (by token ids) of the split",
                                       path=root / fmt.MANIFEST_NAME, field=f"splits.{s.name}.num_prompts",
                                       expected=len(per[s.name]), actual=s.num_prompts, section="§8 R19")))
        if s.by != "prompt":
            continue
        for other, keys_o in per.items():
            shared = np.intersect1d(per[s.name], keys_o, assume_unique=True) if other != s.name else []
            if len(shared):
                out.append(str(FormatError(f"split {s.name!r} is drawn by prompt but shares {len(shared)} prompt(s) "
                                           f"with split {other!r}", path=root / fmt.MANIFEST_NAME,
                                           field=f"splits.{s.name}", section="§8 R19")))
    return out


def _tokenizer_file_problems(root: Path, m: fmt.Manifest) -> list[str]:
    """The dataset's copy of its tokenizer file (manifest tokenizer.file: path, bytes, xxh3_128),
    when it has one, against its recorded size and checksum (FORMAT.md §5.2)."""
    e = (m.tokenizer or {}).get("file")
    if e is None:
        return []
    fld = "tokenizer.file"
    try:
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise FormatError("must be an object with path, bytes and xxh3_128", path=root / fmt.MANIFEST_NAME,
                              field=fld, section="§5.2")
        p = fmt.resolve_file(root, fmt.check_relpath(e["path"], root / fmt.MANIFEST_NAME, fld + ".path"))
        size = fmt.regular_file_size(p, fld)  # never open a FIFO or device (R4)
        if size != e.get("bytes"):
            raise ChecksumError("file size differs from the manifest", path=p, field=fld + ".bytes",
                                expected=e.get("bytes"), actual=size, section="§5.2")
        got = fmt.file_checksum(p)
        if got != e.get(fmt.CHECKSUM_KEY):
            raise ChecksumError("checksum mismatch", path=p, field=fld, expected=e.get(fmt.CHECKSUM_KEY),
                                actual=got, section="§5.2")
    except FormatError as err:
        return [str(err)]
    except OSError as err:
        return [str(FormatError(f"cannot read file ({err.strerror or err})", path=root / str(e.get("path")),
                                field=fld, section="§5.2"))]
    return []


_CHUNK = 1 << 22  # pairs per vectorised step in verify: bounded temporaries (~100 MiB)


def _verify_shard(sh: _Shard, i: int, vocab_size: int, *, tokens_max: int | None = None) -> list[str]:
    """Invariants of one mapped shard (FORMAT.md §8 R13-R17), chunked over pairs.

    ``tokens_max``: the largest token id when the hashing pass already computed it.
    """
    scan = _scan_segments(sh)
    return (_segment_problems(scan, sh, i) + _prompt_count_problems(scan, sh, i)
            + _token_id_problems(sh, i, vocab_size, tokens_max) + _column_problems(sh, i))


@dataclass
class _Faults:
    """The pairs (or segments) that break one rule: how many, and the first one, described."""

    count: int = 0
    first: str = ""

    def note(self, bad: np.ndarray, describe: Callable[[], str]) -> None:
        """Count the True entries of ``bad``; ``describe()`` names the first, if none was seen before."""
        if bad.any():
            if not self.count:
                self.first = describe()
            self.count += int(bad.sum())


@dataclass
class _SegmentScan:
    """One pass over a shard's starts and lengths (R13, R17)."""

    outside: _Faults = field(default_factory=_Faults)  # R13: segment outside the tokens, or empty
    out_of_order: _Faults = field(default_factory=_Faults)  # R17: pairs not stored in order without gaps
    unknown_prompt: _Faults = field(default_factory=_Faults)  # R17: reused prompt that no earlier pair stored
    end: int = 0  # where the last pair's rejected segment ends
    stored_prompts: int = 0  # pairs that store their prompt (the rest reuse an earlier one)
    shared: bool = False  # pairs share completions (§7.6): R17 checked by _tiles_with_shared_completions


def _tiles_with_shared_completions(starts: np.ndarray, lengths: np.ndarray, t: int) -> bool:
    """R17 for a shard whose pairs may share completions (FORMAT.md §7.6), in one vectorised pass.

    Each distinct prompt start and each distinct completion start (chosen and rejected together) is
    stored at its first use; every later use has the same length. Taken in pair order (prompt, chosen,
    rejected), the first uses must tile ``[0, t)`` exactly. A start shared by a prompt and a
    completion, or a reuse pointing at a segment of the other kind, breaks the tiling.
    """
    st, ln = np.asarray(starts), np.asarray(lengths)
    if st.shape[1] == 0:
        return t == 0
    ps, pl = st[0], ln[0]
    cs = st[1:].T.reshape(-1)  # c0 r0 c1 r1 ...: the storage order of completions
    cl = ln[1:].T.reshape(-1)
    up, pfirst = np.unique(ps, return_index=True)
    uc, cfirst = np.unique(cs, return_index=True)
    if (pl != pl[pfirst][np.searchsorted(up, ps)]).any() or (cl != cl[cfirst][np.searchsorted(uc, cs)]).any():
        return False
    key = np.concatenate([3 * pfirst, 3 * (cfirst // 2) + 1 + cfirst % 2])
    order = np.argsort(key, kind="stable")
    seg_s = np.concatenate([up, uc])[order]
    seg_e = seg_s + np.concatenate([pl[pfirst], cl[cfirst]])[order]
    return bool(seg_s[0] == 0 and (seg_s[1:] == seg_e[:-1]).all() and seg_e[-1] == t)


def _scan_segments(sh: _Shard) -> _SegmentScan:
    scan = _SegmentScan()
    t = sh.tokens.shape[0]
    new_starts: list[np.ndarray] = []  # starts and lengths of first-stored prompts (R17)
    new_lens: list[np.ndarray] = []
    for a in range(0, sh.info.num_pairs, _CHUNK):
        st = np.asarray(sh.starts[:, a:a + _CHUNK])
        ln = np.asarray(sh.lengths[:, a:a + _CHUNK])
        _check_bounds(st, ln, t, a, scan.outside)
        new = _check_order(st, ln, a, scan)
        new_starts.append(st[0][new])
        new_lens.append(ln[0][new])
        _check_reused(st[0], ln[0], new, new_starts, new_lens, a, scan.unknown_prompt)
    scan.stored_prompts = sum(len(x) for x in new_starts)
    faults = scan.out_of_order.count or scan.unknown_prompt.count or scan.end != t
    if not scan.outside.count and faults and _tiles_with_shared_completions(sh.starts, sh.lengths, t):
        # the multi-completion layout (§7.6): R17 holds in its general form
        scan.out_of_order, scan.unknown_prompt, scan.end, scan.shared = _Faults(), _Faults(), t, True
    return scan


def _check_bounds(st: np.ndarray, ln: np.ndarray, t: int, a: int, faults: _Faults) -> None:
    """R13: every segment inside the tokens and non-empty; int64 cannot overflow: t - st only where st <= t."""
    bad = (st < 0) | (ln < 1) | (st > t) | (ln > t - np.minimum(st, t))

    def first() -> str:
        seg, col = np.argwhere(bad)[0]
        return f"pair {a + int(col)} {fmt.SEGMENTS[seg]} [start {int(st[seg, col])}, length {int(ln[seg, col])})"

    faults.note(bad, first)


def _check_order(st: np.ndarray, ln: np.ndarray, a: int, scan: _SegmentScan) -> np.ndarray:
    """R17: pair order, no gaps: [new prompt] chosen rejected, each pair after the previous one.
    Returns which pairs store their prompt (bool ``(chunk,)``); advances ``scan.end``."""
    ps, cs, rs = st
    pl, cl, rl = ln
    prev = np.empty_like(cs)  # where the previous pair ends
    if len(cs):
        prev[0] = scan.end
        np.add(rs[:-1], rl[:-1], out=prev[1:])
        scan.end = int(rs[-1]) + int(rl[-1])
    new = ps == prev
    in_order = (cs + cl == rs) & np.where(new, cs == ps + pl, (cs == prev) & (ps < prev))

    def first() -> str:
        j = int(np.flatnonzero(~in_order)[0])
        return (f"pair {a + j}: prompt {int(ps[j])}+{int(pl[j])}, chosen {int(cs[j])}+{int(cl[j])}, "
                f"rejected {int(rs[j])}+{int(rl[j])}, previous pair ends at {int(prev[j])}")

    scan.out_of_order.note(~in_order, first)
    return new


def _check_reused(ps: np.ndarray, pl: np.ndarray, new: np.ndarray, new_starts: list[np.ndarray],
                  new_lens: list[np.ndarray], a: int, faults: _Faults) -> None:
    """R17: a reused prompt start is that of an earlier first-stored prompt, with the same length."""
    reused = np.flatnonzero(~new)
    if not reused.size:
        return
    known_s = np.concatenate(new_starts)
    known_l = np.concatenate(new_lens)
    k = np.searchsorted(known_s, ps[reused])
    kc = np.minimum(k, max(len(known_s) - 1, 0))
    known = ((k < len(known_s)) & (known_s[kc] == ps[reused]) & (known_l[kc] == pl[reused])
             if len(known_s) else np.zeros(reused.size, dtype=bool))

    def first() -> str:
        j = int(reused[np.flatnonzero(~known)[0]])
        return (f"pair {a + j}: prompt [start {int(ps[j])}, length {int(pl[j])}) is not "
                f"a prompt stored earlier in this shard")

    faults.note(~known, first)


def _segment_problems(scan: _SegmentScan, sh: _Shard, i: int) -> list[str]:
    t = sh.tokens.shape[0]
    out = []
    if scan.outside.count:
        out.append(str(FormatError(f"{scan.outside.count} segment(s) outside tokens [0, {t}) or empty; "
                                   f"first: {scan.outside.first}",
                                   path=sh.dir, field=f"shards[{i}].starts/lengths", section="§8 R13")))
    if scan.out_of_order.count or scan.end != t:
        detail = (f"{scan.out_of_order.count} pair(s) out of order; first: {scan.out_of_order.first}"
                  if scan.out_of_order.count else f"the last segment ends at {scan.end}, tokens hold {t}")
        out.append(str(FormatError(f"segments are not stored in pair order without gaps ({detail})",
                                   path=sh.dir, field=f"shards[{i}].starts/lengths", section="§8 R17")))
    if scan.unknown_prompt.count:
        out.append(str(FormatError(f"{scan.unknown_prompt.count} reused prompt(s) do not match a stored prompt; "
                                   f"first: {scan.unknown_prompt.first}",
                                   path=sh.dir, field=f"shards[{i}].starts[0]", section="§8 R17")))
    return out


def _prompt_count_problems(scan: _SegmentScan, sh: _Shard, i: int) -> list[str]:
    """R15: num_prompts is the number of distinct prompt starts."""
    if not sh.info.num_pairs:
        return []
    # the first-stored prompts when R17 holds (no sort needed)
    distinct = (scan.stored_prompts if not (scan.out_of_order.count or scan.unknown_prompt.count or scan.shared)
                else len(np.unique(sh.starts[0])))
    if distinct == sh.info.num_prompts:
        return []
    return [str(FormatError("num_prompts differs from the distinct prompt starts", path=sh.dir,
                            field=f"shards[{i}].num_prompts", expected=int(distinct),
                            actual=sh.info.num_prompts, section="§8 R15"))]


def _token_id_problems(sh: _Shard, i: int, vocab_size: int, tokens_max: int | None) -> list[str]:
    """R14: every token id below vocab_size (``tokens_max``: the maximum, when already known)."""
    t = sh.tokens.shape[0]
    hi = -1 if tokens_max is None else tokens_max
    for a in range(0, t if tokens_max is None else 0, 1 << 24):
        hi = max(hi, int(sh.tokens[a:a + (1 << 24)].max()))
    if hi < vocab_size:
        return []
    return [str(FormatError("token id >= vocab_size", path=sh.dir / fmt.TOKENS_FILE,
                            field=f"shards[{i}].tokens", expected=f"< {vocab_size}", actual=hi,
                            section="§8 R14"))]


def _column_problems(sh: _Shard, i: int) -> list[str]:
    """R16: float columns hold finite values only."""
    out = []
    for name, col in sh.columns.items():
        if col.dtype.kind == "f" and sh.info.num_pairs:
            finite = np.isfinite(col)
            if not finite.all():
                j = int(np.flatnonzero(~finite)[0])
                out.append(str(FormatError(f"{int((~finite).sum())} non-finite value(s); first at pair {j}: "
                                           f"{col[j]}", path=sh.dir, field=f"shards[{i}].columns.{name}",
                                           section="§8 R16")))
    return out
