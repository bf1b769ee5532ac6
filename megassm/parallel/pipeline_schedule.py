"""Pipeline schedules as data: each rank's ordered list of compute ops, and a timeline that pairs
every point-to-point message on both of its ranks.

A model cut into ``S = pp * v`` *virtual stages*; virtual stage ``vs`` lives on rank ``vs % pp`` as
that rank's chunk ``vs // pp`` (``v = 1``: plain 1F1B, one chunk per rank; ``v > 1``: Megatron's
interleaved 1F1B). An op is ``F`` (forward) or ``B`` (backward) of one chunk on one micro-batch.

    F(vs, i) needs F(vs-1, i)'s output        (a message rank (vs-1)%pp -> vs%pp)
    B(vs, i) needs B(vs+1, i)'s input grads   (a message rank (vs+1)%pp -> vs%pp), or the loss

``simulate`` runs the op lists with forward = 1 and backward = 2 time units (per chunk, divided by
v) and returns, for every rank, its ops interleaved with *exchange points*: a message sent at time T
is posted by its sender and its receiver in their exchange at T. Each rank executes its events in
order; all messages of one exchange go out as one batch of isend/irecv. Both ends of every
message meet in the same batch, so the pairing does not depend on tags (NCCL has none) and no rank
can wait on a peer that waits on it: by induction on T, every exchange before T has completed.

Bubble: the fraction of rank-time spent idle, 1 - busy / (pp * makespan). For 1F1B it is
(pp - 1) / (m + pp - 1) whatever the backward / forward ratio; interleaving divides the idle time
by v: (pp - 1) / (v*m + pp - 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction


@dataclass(frozen=True)
class Op:
    kind: str  # "F" | "B"
    chunk: int  # which of this rank's virtual stages (0 .. v-1)
    mb: int  # micro-batch index

    def __repr__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.mb}"


@dataclass(frozen=True)
class Message:
    """Activations (kind "F": vs -> vs+1) or their gradients (kind "B": vs -> vs-1) of micro-batch ``mb``."""

    kind: str
    vs: int  # the virtual stage that produces it
    mb: int
    src: int  # pipeline ranks
    dst: int
    time: Fraction  # when the producing op ends


@dataclass
class Exchange:
    """One batch of sends and receives of a rank, at ``time``."""

    time: Fraction
    sends: list[Message] = field(default_factory=list)
    recvs: list[Message] = field(default_factory=list)


@dataclass
class Timeline:
    pp: int
    virtual: int
    micro_batches: int
    events: list[list[Op | Exchange]]  # per rank, in execution order
    busy: list[Fraction]  # per rank
    makespan: Fraction

    @property
    def bubble_fraction(self) -> float:
        return float(1 - sum(self.busy) / (self.pp * self.makespan))


def schedule_1f1b(pp: int, m: int, rank: int) -> list[Op]:
    """One forward-one-backward (PipeDream-flush): ``pp - rank - 1`` warm-up forwards, then
    alternate, then drain. A rank keeps at most ``pp - rank`` micro-batches' activations."""
    warmup = min(pp - rank - 1, m)
    ops = [Op("F", 0, i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [Op("F", 0, warmup + i), Op("B", 0, i)]
    return ops + [Op("B", 0, i) for i in range(m - warmup, m)]


def schedule_interleaved_1f1b(pp: int, m: int, v: int, rank: int) -> list[Op]:
    """Megatron-LM's interleaved 1F1B: micro-batches go through the chunks in groups of ``pp``.
    Needs ``m % pp == 0`` (every group fills the pipeline)."""
    if m % pp:
        raise ValueError(f"interleaved 1F1B needs micro_batches ({m}) to be a multiple of pp ({pp})")
    total = m * v

    def chunk(k: int, forward: bool) -> int:
        c = (k % (pp * v)) // pp
        return c if forward else v - 1 - c

    def mb(k: int) -> int:
        return (k // (pp * v)) * pp + k % pp

    warmup = min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    ops = [Op("F", chunk(k, True), mb(k)) for k in range(warmup)]
    for j in range(total - warmup):
        ops += [Op("F", chunk(warmup + j, True), mb(warmup + j)), Op("B", chunk(j, False), mb(j))]
    return ops + [Op("B", chunk(k, False), mb(k)) for k in range(total - warmup, total)]


def schedule(pp: int, m: int, v: int = 1) -> list[list[Op]]:
    """Every rank's op list (every rank computes all of them: they decide the message pairing)."""
    if pp < 1 or m < 1 or v < 1:
        raise ValueError(f"pipeline schedule needs pp, micro_batches, virtual >= 1; got {pp}, {m}, {v}")
    if v == 1:
        return [schedule_1f1b(pp, m, r) for r in range(pp)]
    return [schedule_interleaved_1f1b(pp, m, v, r) for r in range(pp)]


def simulate(ops: list[list[Op]], v: int = 1, t_f: Fraction = Fraction(1), t_b: Fraction = Fraction(2)) -> Timeline:
    """Time every op (as early as its rank and its inputs allow) and place the exchange points."""
    pp = len(ops)
    S = pp * v
    dur = {"F": Fraction(t_f) / v, "B": Fraction(t_b) / v}
    end: dict[tuple[str, int, int], Fraction] = {}  # (kind, vs, mb) -> end time
    start_of: list[list[Fraction]] = [[] for _ in range(pp)]
    clock = [Fraction(0)] * pp
    pos = [0] * pp
    m = 1 + max(op.mb for rank_ops in ops for op in rank_ops)

    def dependency(rank: int, op: Op) -> tuple[str, int, int] | None:
        vs = op.chunk * pp + rank
        if op.kind == "F":
            return ("F", vs - 1, op.mb) if vs > 0 else None
        return ("B", vs + 1, op.mb) if vs < S - 1 else ("F", vs, op.mb)

    remaining = sum(map(len, ops))
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(ops[r]):
                op = ops[r][pos[r]]
                dep = dependency(r, op)
                if dep is not None and dep not in end:
                    break
                t0 = max(clock[r], end[dep]) if dep is not None else clock[r]
                if op.kind == "B" and ("F", op.chunk * pp + r, op.mb) not in end:
                    raise ValueError(f"rank {r}: {op} comes before its forward")
                start_of[r].append(t0)
                clock[r] = end[(op.kind, op.chunk * pp + r, op.mb)] = t0 + dur[op.kind]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: ops[r][pos[r]] for r in range(pp) if pos[r] < len(ops[r])}
            raise ValueError(f"pipeline schedule deadlocks: every rank waits ({stuck})")
    _check_complete(ops, v, m)
    messages = _messages(end, pp, S)
    events = [_merge(ops[r], start_of[r], messages, r) for r in range(pp)]
    busy = [sum(dur[op.kind] for op in ops[r]) for r in range(pp)]
    return Timeline(pp, v, m, events, busy, max(clock))


def _check_complete(ops: list[list[Op]], v: int, m: int) -> None:
    for r, rank_ops in enumerate(ops):
        want = {(k, c, i) for k in "FB" for c in range(v) for i in range(m)}
        have = [(op.kind, op.chunk, op.mb) for op in rank_ops]
        if len(have) != len(want) or set(have) != want:
            raise ValueError(f"rank {r}: the schedule must run F and B of every chunk on every micro-batch once")


def _messages(end: dict, pp: int, S: int) -> list[Message]:
    out = []
    for (kind, vs, mb), t in end.items():
        nxt = vs + 1 if kind == "F" else vs - 1
        if 0 <= nxt < S and nxt % pp != vs % pp:
            out.append(Message(kind, vs, mb, vs % pp, nxt % pp, t))
    return out


def _merge(rank_ops: list[Op], starts: list[Fraction], messages: list[Message], rank: int) -> list[Op | Exchange]:
    """This rank's ops and exchanges in time order; at equal times the exchange goes first (an op
    starting at T may need a message sent at T; an op ending at T started before it)."""
    by_time: dict[Fraction, Exchange] = {}
    for msg in messages:
        if rank in (msg.src, msg.dst):
            ex = by_time.setdefault(msg.time, Exchange(msg.time))
            (ex.sends if msg.src == rank else ex.recvs).append(msg)
    keyed = [((t, 1, i), op) for i, (t, op) in enumerate(zip(starts, rank_ops))]
    keyed += [((t, 0, 0), ex) for t, ex in by_time.items()]
    for _, ex in keyed:
        if isinstance(ex, Exchange):  # a fixed order inside a batch: by kind, then micro-batch
            ex.sends.sort(key=lambda x: (x.kind, x.vs, x.mb))
            ex.recvs.sort(key=lambda x: (x.kind, x.vs, x.mb))
    return [e for _, e in sorted(keyed, key=lambda kv: kv[0])]


def bubble_fraction(pp: int, m: int, v: int = 1) -> float:
    """The simulated idle fraction of ``schedule(pp, m, v)``."""
    return simulate(schedule(pp, m, v), v).bubble_fraction
