"""Learning-rate schedules used through LambdaLR (multipliers of the base rate), as in the original."""
import numpy as np


class LambdaWarmUpCosineScheduler:
    """Linear warm-up, then cosine decay from lr_max to lr_min over max_decay_steps."""

    def __init__(self, warm_up_steps, lr_min, lr_max, lr_start, max_decay_steps, verbosity_interval=0):
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start, self.lr_min, self.lr_max = lr_start, lr_min, lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.verbosity_interval = verbosity_interval

    def schedule(self, n, **kwargs):
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"current step: {n}")
        if n < self.lr_warm_up_steps:
            return (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        t = min((n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps), 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + np.cos(t * np.pi))

    def __call__(self, n, **kwargs):
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler:
    """Cycles of linear warm-up then linear decay; the schedule of the SD v1 configs."""

    def __init__(self, warm_up_steps, f_min, f_max, f_start, cycle_lengths, verbosity_interval=0):
        assert len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths)
        self.lr_warm_up_steps = warm_up_steps
        self.f_start, self.f_min, self.f_max = f_start, f_min, f_max
        self.cycle_lengths = cycle_lengths
        self.cum_cycles = np.cumsum([0] + list(self.cycle_lengths))
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n):
        for interval, cl in enumerate(self.cum_cycles[1:]):
            if n <= cl:
                return interval
        return len(self.cycle_lengths) - 1

    def schedule(self, n, **kwargs):
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"current step: {n}, recent lr-multiplier: {self.f_start[cycle]}, current cycle {cycle}")
        if n < self.lr_warm_up_steps[cycle]:
            return (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (
            self.cycle_lengths[cycle] - n) / self.cycle_lengths[cycle]

    def __call__(self, n, **kwargs):
        return self.schedule(n, **kwargs)


# The names of diffusers' `get_scheduler` and kohya's --lr_scheduler, as multipliers of the base rate.
PEER_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


class LambdaPeerScheduler:
    """diffusers'/kohya's schedules by name, as diffusers.optimization defines them: the rate held (constant,
    which has no warm-up), or a linear warm-up from 0 over `warmup_steps` and then the rate held
    (constant_with_warmup) or decayed to 0 at `total_steps` in a straight line (linear) or half a cosine."""

    def __init__(self, name, warmup_steps=0, total_steps=None):
        if name not in PEER_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {name!r}: choose one of {', '.join(PEER_SCHEDULES)}")
        if name in ("linear", "cosine") and (total_steps is None or total_steps <= 0):
            raise ValueError(f"the {name} schedule decays to 0 at the last step: give --max_steps")
        if name == "constant" and warmup_steps:
            raise ValueError("the constant schedule has no warm-up: use constant_with_warmup")
        self.name, self.warmup_steps, self.total_steps = name, max(int(warmup_steps), 0), total_steps

    def schedule(self, n, **kwargs):
        if n < self.warmup_steps:
            return n / self.warmup_steps
        if self.name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (n - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if self.name == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + np.cos(np.pi * progress)))

    def __call__(self, n, **kwargs):
        return self.schedule(n, **kwargs)

    def __str__(self):
        warmup = f" after {self.warmup_steps} warm-up steps from 0" if self.warmup_steps else ""
        decay = f", decaying to 0 at step {self.total_steps}" if self.name in ("linear", "cosine") else ""
        return f"{self.name}{warmup}{decay}"


def parse_step_rates(text):
    """AUTOMATIC1111's learning-rate syntax, "0.005:100, 1e-3:1000, 1e-5": each rate until the step after
    its colon (exclusive), the last one (without a step, or with -1) from there on. -> [(rate, end step or
    None)]."""
    pairs = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        rate, _, step = part.partition(":")
        try:
            end = int(step) if step.strip() else -1
            pairs.append((float(rate), None if end == -1 else end))
        except ValueError:
            raise ValueError(f"learning rate {text!r}: write a rate, or rates with the step each lasts until, "
                             "e.g. '0.005:100, 1e-3:1000, 1e-5'") from None
        if pairs[-1][1] is None:
            break
    ends = [end for _, end in pairs if end is not None]
    if not pairs or ends != sorted(set(ends)) or any(end <= 0 for end in ends) or any(r <= 0 for r, _ in pairs):
        raise ValueError(f"learning rate {text!r}: give positive rates whose steps increase, "
                         "e.g. '0.005:100, 1e-3:1000, 1e-5'")
    return pairs


class LambdaStepScheduler:
    """AUTOMATIC1111's step schedule ("0.005:100, 1e-3:1000, 1e-5", see parse_step_rates) as multipliers of
    its first rate, which is the base rate; past the last step, the last rate holds."""

    def __init__(self, rates):
        self.pairs = parse_step_rates(rates)
        self.text = rates

    def schedule(self, n, **kwargs):
        for rate, end in self.pairs:
            if end is None or n < end:
                return rate / self.pairs[0][0]
        return self.pairs[-1][0] / self.pairs[0][0]

    def __call__(self, n, **kwargs):
        return self.schedule(n, **kwargs)

    def __str__(self):
        return f"steps {self.text!r} (AUTOMATIC1111 syntax)"
