"""The ``race`` strategy: every survivor trains for the same seconds *from the same weights* (the caller
snapshots and restores them when the engine asks, see `RuleEngine.take_ops`), each is judged by the metric it
would reach by the race's horizon (`judge_race`), the winner's end state is kept and exploited, and the race is
re-run from the current weights once its cost has been paid back ``1/search_share`` times over. When the time
left is known, a race is only run if its estimated cost is at most ``search_share`` of that time; otherwise the
incumbent goes on, or, with none yet, the least frozen of the fastest candidates, whose accuracy freezing does
not cap."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...config import DEFAULT_SEARCH_SHARE, MIB, MemoryConfig
from ..candidates import Candidate, Choice, Outcome, RaceTrial
from ..scoring import judge_race, payback_seconds, trial_gain

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RuleEngine


@dataclass
class RaceState:
    """What a race has done and has left; saved under every strategy (``racing`` stays False under ``ucb``).

    Its fields are the keys of the ``"race"`` entry of `RuleEngine.state_dict` (see `codec`).
    """

    ops: list[str] = field(default_factory=list)  # for the caller, in order, before the next step: `take_ops`
    queue: list[MemoryConfig] = field(default_factory=list)  # left to trial
    racing: bool = False
    trials: dict[MemoryConfig, RaceTrial] = field(default_factory=dict)  # in race order
    saved: MemoryConfig | None = None  # whose end state the "best" copy holds
    mid: tuple[float, float] | None = None  # (metric, trial progress: seconds or steps) half-way through this trial
    want_mid: bool = False
    start_metric: float | None = None
    start_search_s: float = 0.0
    trial_s: float | None = None  # how long each trial of this race lasts (set by its first)
    trial_steps: int | None = None  # the same in steps (set by its first; what trials share under gain_per='step')
    exploit_until_s: float | None = None
    discarded_seconds: float = 0.0  # training time of race trials whose weights were thrown away
    incumbent: MemoryConfig | None = None  # the last race's winner
    streak: int = 0  # races in a row that the incumbent won
    horizon_s: float | None = None  # how far ahead this race's trials are projected
    horizon_steps: float | None = None  # the same in steps, under gain_per='step'


def _slow_key(c: Candidate) -> tuple[float, float, int, int]:
    known = c.step_s if c.step_s is not None else 0.0
    return (-known, *c.config.frozenness, c.config.micro_batch_size, -c.config.checkpoint_segments)


class Race:
    """The race's decisions, on its own `RaceState`. The engine reads that state (``engine.race_state``) and
    changes it only through the methods below (`new_trial`, `keep_only`, `start_from`, `take_ops`)."""

    measures = True

    def __init__(self, engine: RuleEngine) -> None:
        self.engine = engine
        self.state = RaceState()

    # -------------------------------------------------------------- what the engine tells the race

    def new_trial(self) -> None:
        """A trial begins: its half-way metric is not measured yet."""
        self.state.mid, self.state.want_mid = None, False

    def keep_only(self, alive: set[MemoryConfig]) -> None:
        """The survivors are now ``alive``: the race trials none of the others."""
        self.state.queue = [c for c in self.state.queue if c in alive]

    def start_from(self, metric: float) -> None:
        """The gain metric on the weights a race (opened at a task boundary) starts from, when it has none yet."""
        if self.state.racing and self.state.start_metric is None:
            self.state.start_metric = metric

    def take_ops(self) -> list[str]:
        """The copy operations due (`RuleEngine.take_ops`), handed over once."""
        ops, self.state.ops = self.state.ops, []
        return ops

    # -------------------------------------------------------------- the strategy protocol

    def start(self, step: int) -> Choice:
        return self.begin(step, "start")

    def wants_metric(self, step: int, retuned: bool) -> bool | Choice:
        e, s = self.engine, self.state
        if not s.racing:
            if retuned:
                return True  # the metric that starts the re-opened race
            if s.exploit_until_s is None or e.elapsed_s < s.exploit_until_s:
                return False
            pays, why = self.pays(self.order())
            if not pays:  # exploit to the end of the horizon; no evaluation is spent on a race not run
                s.exploit_until_s = None
                return Choice(e.current, Outcome.EXPLOITATION_OVER, f"exploitation over: no new race ({why})")
            return True
        if e.trial_over(1.0):
            return True
        if e.late_gain and s.mid is None and e.trial_over(0.5):
            s.want_mid = True  # half-way: the metric here starts the second half the trial is judged on
            return True
        return False

    def on_metric(self, step: int, metric: float) -> Choice | None:
        e, s = self.engine, self.state
        if not s.racing:  # the exploitation is over: its gain is one more estimate, then race again
            e.credit_trial(metric)
            e.reopen()
            return self.begin(step, "exploitation over")
        if s.want_mid:
            s.want_mid, s.mid = False, (metric, e.trial_progress)
            return None  # the trial goes on
        start = s.start_metric if s.start_metric is not None else metric
        horizon = s.horizon_steps if e.gain_per == "step" else s.horizon_s
        gain, projected = trial_gain(start, metric, e.trial_progress, s.mid, horizon, e.metric_ceiling,
                                     e.last_se or 0.0)
        self.record_trial(e.current, gain, metric, projected)
        if s.queue:
            s.ops.append("restore_start")
            following = s.queue.pop(0)
            n = len(s.trials) + len(s.queue) + 1
            e.restart_trial()
            return Choice(following, Outcome.RACE_TRIAL, f"trial: race {len(s.trials) + 1}/{n} from the same weights")
        return self.finish(step)

    def restart(self, step: int, reason: str, new_task: bool = False) -> Choice:
        self.abandon()
        if new_task:
            self.state.streak = 0
        return self.begin(step, reason)

    def on_infeasible(self, step: int, config: MemoryConfig, reason: str) -> Choice:
        """``config`` (the current trial's) cannot run: the race goes on without it, from its start again."""
        e, s = self.engine, self.state
        e.reprune(reason)
        self.keep_only({c.config for c in e.survivors})
        if not s.racing:
            return self.begin(step, reason)
        s.ops.append("restore_start")  # the failed trial's partial steps are undone
        if s.queue:
            return Choice(s.queue.pop(0), Outcome.RACE_TRIAL, f"{reason}: next in the race")
        if s.trials:
            return self.finish(step)
        return self.begin(step, reason)

    # -------------------------------------------------------------- a race's course

    def order(self) -> list[MemoryConfig]:
        """Slowest first, so that the first trial (which sets every trial's length) covers trial_steps of each."""
        return [c.config for c in sorted(self.engine.survivors, key=_slow_key)]

    def begin(self, step: int, reason: str) -> Choice:
        e, s = self.engine, self.state
        order = self.order()
        if len(order) == 1:  # nothing to compare: run it until something changes
            s.racing, s.exploit_until_s = False, None
            return Choice(order[0], Outcome.ONLY_CANDIDATE, f"{reason}: the only feasible candidate")
        roomy = e.leave_room_for_copies(order)
        room_note = ""
        if len(roomy) < 2:  # the fastest of each set leave no room for the copies: race slower ones that do
            smaller = [c.config for c in sorted(e.roomy_survivors(), key=_slow_key)]
            if len(smaller) >= 2:
                roomy, order = smaller, smaller
                room_note = ", at configurations that leave room for its two host copies"
        if len(roomy) < 2:  # the race's two copies do not fit beside any two candidates: no race, and say so
            s.racing, s.exploit_until_s = False, None
            return Choice(self.no_race_choice(), Outcome.NO_RACE_ROOM,
                          f"{reason}: no race (the budget leaves no room for its two host copies of "
                          f"{e.copy_bytes / MIB:.1f} MiB beside two candidates): the least frozen, fastest candidate")
        if len(roomy) < len(order):
            room_note = f", {len(order) - len(roomy)} left out for the room its two host copies take"
            order = roomy
        pays, why = self.pays(order)
        if not pays:  # run until something changes (a task boundary, an out-of-memory error, drift)
            s.racing, s.exploit_until_s = False, None
            choice = self.no_race_choice()
            kind = "the last race's winner" if choice == s.incumbent else "the least frozen, fastest candidate"
            return Choice(choice, Outcome.NO_RACE_COST, f"{reason}: no race ({why}): {kind}")
        s.racing, s.queue = True, order[1:]
        s.trials = {}
        s.horizon_s = self.projection_horizon(order)  # before trial_s is reset: it uses the last race's
        trial_steps = s.trial_steps or e.trial_steps  # as `cost_steps` counts it: the last race's, else the setting
        s.horizon_steps = (max(e.steps_left - self.cost_steps(order) - trial_steps, 0) if e.steps_left is not None
                           else self.in_steps(s.horizon_s, order))
        s.saved = None
        s.start_metric, s.trial_s, s.trial_steps = e.baseline, None, None
        s.start_search_s = e.search_seconds
        s.ops.append("snapshot")
        return Choice(order[0], Outcome.RACE_ROOM if room_note else Outcome.RACE_TRIAL,
                      f"{reason}: race 1/{len(order)} from the same weights{room_note}")

    def stop(self, step: int) -> Choice | None:
        """See `RuleEngine.stop_race`."""
        e, s = self.engine, self.state
        if not s.racing:
            return None
        keep = s.saved
        s.ops = [op for op in s.ops if op == "save_best"] + (["restore_best"] if keep is not None else []) + ["drop"]
        s.racing, s.queue = False, []
        s.exploit_until_s = e.elapsed_s
        choice = keep if keep is not None else e.current
        if keep is not None:
            e.go_on_from(s.trials[keep].metric)
        e.restart_trial()
        if keep is None:
            return Choice(choice, Outcome.KEEP_CURRENT, "training stopped mid-race before a trial ended: go on as is")
        return Choice(choice, Outcome.KEEP_BEST, "training stopped mid-race: keep the best trial that ended")

    def abandon(self) -> None:
        s = self.state
        if s.racing:
            s.ops.append("drop")
        s.racing, s.queue = False, []

    def record_trial(self, config: MemoryConfig, gain: float, metric: float, projected: float | None = None) -> None:
        e, s = self.engine, self.state
        s.trials[config] = RaceTrial(gain, metric, e.trial_seconds, e.last_se, projected)
        if s.trial_s is None:
            s.trial_s, s.trial_steps = e.trial_seconds, e.trial_steps_done
        e.credit(config, gain)
        if self.winner()[0] == config:  # the winner so far: keep its end state
            s.ops.append("save_best")
            s.saved = config

    def winner(self) -> tuple[MemoryConfig, bool]:
        """(winner so far, whether it won a tie): see `judge_race`."""
        s = self.state
        length = s.trial_steps if self.engine.gain_per == "step" else s.trial_s
        return judge_race(s.trials, length, self.engine.significance)

    def finish(self, step: int) -> Choice:
        e, s = self.engine, self.state
        winner, by_tie = self.winner()
        if winner not in (e.current, s.saved):  # its end state is gone (ties judged on another error)
            winner, by_tie = s.saved, False
        if winner != e.current:
            s.ops.append("restore_best")
        s.ops.append("drop")
        discarded = sum(t.seconds for c, t in s.trials.items() if c != winner)
        s.discarded_seconds += discarded
        cost = discarded + e.search_seconds - s.start_search_s
        # exploit until the race's cost is at most search_share of the time since the race began; each
        # race that confirms the incumbent doubles that (up to 8x): a settled choice is re-checked less often
        s.streak = s.streak + 1 if winner == s.incumbent else 0
        s.incumbent = winner
        kept = s.trials[winner].seconds
        s.exploit_until_s = e.elapsed_s + max(self.exploitation_s(cost) - kept, 0.0)
        s.racing = False
        e.go_on_from(s.trials[winner].metric)
        e.restart_trial()
        run = e.fastest_sibling(winner)  # the copies are gone: the same learning at the fastest that fits
        tie = f", the least frozen within {e.significance:g} standard errors of the best" if by_tie else ""
        won = s.trials[winner]
        per_step = e.gain_per == "step"
        horizon, unit = (s.horizon_steps, "steps") if per_step else (s.horizon_s, "s")
        ahead = (f"{won.projected:.4g} projected {horizon:.1f} {unit} ahead, " if won.projected is not None
                 and horizon is not None else "")
        sibling = "" if run == winner else f", run as {run.short()}"
        rate = "/step" if per_step else "/s"
        return Choice(run, Outcome.RACE_WON, f"race won by {winner.short()} ({ahead}{won.gain:.4g}{rate} over "
                                             f"{len(s.trials)}{tie}{sibling}): exploit for "
                                             f"{s.exploit_until_s - e.elapsed_s:.1f} s")

    # -------------------------------------------------------------- what a race costs and buys

    def share(self) -> float:
        return self.engine.search_share or DEFAULT_SEARCH_SHARE

    def exploitation_s(self, cost: float) -> float:
        """Training seconds a race costing ``cost`` buys: its payback at ``search_share``, doubled for each race
        in a row that confirmed the incumbent (up to 8x)."""
        return payback_seconds(cost, self.share()) * 2 ** min(self.state.streak, 3)

    def cost_s(self, order: Sequence[MemoryConfig]) -> float:
        """See `RuleEngine.race_cost_s`."""
        e = self.engine
        evals = len(order) * (2 if e.late_gain else 1) * (e.last_eval_s or 0.0)
        return (len(order) - 1) * self.trial_s_estimate(order) + evals

    def trial_s_estimate(self, order: Sequence[MemoryConfig]) -> float:
        """Training seconds one trial of a race among ``order`` is expected to last."""
        e = self.engine
        if self.state.trial_s is not None:
            return self.state.trial_s
        slowest = max((e.candidate(c).step_s or 0.0 for c in order), default=0.0)
        trial = max(e.trial_steps * slowest, e.min_trial_seconds)
        return trial if e.trial_max_s is None else min(trial, e.trial_max_s)

    def cost_steps(self, order: Sequence[MemoryConfig]) -> int:
        """Trainer steps a race among ``order`` throws away (every trial but the winner's), under gain_per='step':
        the samples they trained on are not in the weights that go on."""
        trial = self.state.trial_steps or self.engine.trial_steps
        return (len(order) - 1) * trial

    def pays(self, order: Sequence[MemoryConfig]) -> tuple[bool, str]:
        """Whether a race fits in ``search_share`` of the time left (always, when that time is unknown); under
        gain_per='step', of the steps left, when the run's length is known."""
        e = self.engine
        if e.gain_per == "step" and e.steps_left is not None and len(order) >= 2:
            share, cost = self.share(), self.cost_steps(order)
            return (cost <= share * e.steps_left,
                    f"a race would throw away ~{cost} steps, over {share:g} of the {e.steps_left} steps left")
        left = self.engine.time_left_s
        if left is None or len(order) < 2:
            return True, ""
        share = self.share()
        cost = self.cost_s(order)
        return cost <= share * left, f"a race would cost ~{cost:.2f} s, over {share:g} of the {max(left, 0.0):.1f} s left"

    def projection_horizon(self, order: Sequence[MemoryConfig]) -> float | None:
        """How long the race's winner will train before anything is decided again: the time left after the
        race when it is known, else the exploitation the race's cost buys. None when trials are not projected
        (``late_gain`` off, so no half-way metric)."""
        e = self.engine
        if not e.late_gain:
            return None
        cost, left = self.cost_s(order), e.time_left_s
        if left is not None:
            return max(left - cost - self.trial_s_estimate(order), 0.0)
        return self.exploitation_s(cost)

    def in_steps(self, seconds: float | None, order: Sequence[MemoryConfig]) -> float | None:
        """``seconds`` of training as steps, at the mean step time of the race's candidates: one horizon, the
        same for every trial, so that a faster candidate is not projected over more steps than a slower one."""
        times = [t for t in (self.engine.candidate(c).step_s for c in order) if t]
        if seconds is None or not times:
            return None
        return seconds / (sum(times) / len(times))

    def no_race_choice(self) -> MemoryConfig:
        """Without a race: the last race's winner while it is still feasible, else the least frozen candidate
        (the fastest of those), because freezing caps what training can reach."""
        alive = [c.config for c in self.engine.survivors]
        incumbent = None if self.state.incumbent is None else self.engine.fastest_sibling(self.state.incumbent)
        if incumbent in alive:
            return incumbent
        return min(alive, key=lambda c: c.frozenness)  # survivors are fastest first: ties keep the fastest
