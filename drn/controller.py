"""Budget control: the adaptive cost weight mu (the threshold trim after training is in
calibrate.py: it is not control).

The paper says only that mu "is adjusted adaptively". Here it is a PI controller -- dual ascent
on the constraint cost = target with a proportional term for damping, the PID-Lagrangian recipe
of constrained RL (Stooke et al., 2020) -- driven by the cost the model pays under *hard* routing
(Eq. 11) on training batches, smoothed by an EMA, and aimed at a setpoint that ramps from the
starting cost down to the target. It acts on u = asinh(mu / mu_scale):

    s_k     = start + min(1, k / ramp) * (target - start)       ramp = 30 % of the main epochs
    e_k     = clip(rho * cost_ema_k / s_k - 1, -0.5, 0.5)       relative overshoot (> 0: too expensive)
    I_k     = I_{k-1} + ki / S * e_k                            S = optimisation steps per epoch
    mu      = mu_scale * sinh(u_0 + kp * e_k + I_k)             kept in [mu_min, mu_max]

* asinh space: for |mu| >> mu_scale a step is a relative change (as on log mu), so one gain
  serves mu = 0.05 and 3; near 0 it is linear, so mu can change sign. A budget is an equality
  here (the user wants the accuracy the target pays for, not less compute): a network whose
  routers close blocks with no cost pressure at all -- as short schedules do, because the
  shallower network learns faster -- is pulled back up by mu < 0 (docs/notes/2026-12-01-landing.md, "A signed
  budget loop, and two ways to let routers reopen").
* hard cost, not Eq. 8's soft expectation: the soft/hard gap is what makes fixed-mu methods miss.
* the ramp and the error clip: a network that starts at 95 % of full and is told "30 %" at once
  sees e = +2.2; a first version without them multiplied mu by ~80 within an epoch, every router
  closed (K = 0) and -- with r near 0 the routers get almost no gradient -- never reopened.
  Moving the setpoint gradually keeps e small, so the routers follow instead of collapsing.
* gains are per epoch (ki is divided by the steps in an epoch), so the loop's time constant is
  the same on 4k images and on 50k. Routers that start open (the full network) need a slow loop,
  ki = 2 / epoch: a sustained 10 % overshoot multiplies mu by e^0.2 = 1.22 per epoch, slower than
  the routers adapt. Routers that start on the budget (TrainConfig.router_start, the default) see
  errors of a few % from the first step, and ki = 2 was too slow to hold them there: they
  reopened closed blocks to +16-20 % over a 30 % target, so the trainer passes ki = 8 then
  (docs/notes/2026-12-01-landing.md, "Routers that start on the budget"). kp = 1 damps the integral's overshoot
  without passing much batch-to-batch noise into mu. The first benchmark (bench/controller.py;
  docs/notes/2026-11-25-budget-controller.md, "Budget controller: landing on a FLOPs target") measured the
  result on real training.
* rho, the val/train correction: the landing is judged on the val images in eval mode (no
  augmentation, BN running statistics), the loop measures training batches (augmented views, BN
  batch statistics). From trained blocks (a warm start) the two differ by 3-7 %, the val routes
  dearer: the loop landed the training batches on the target and val missed by up to +10 %
  (docs/notes/2026-12-01-landing.md, "The routers' start, exact, and a loop that steers val"). After every main epoch
  the trainer reports the val cost beside what training batches cost at that moment
  (`observe_val`; `Trainer.batch_cost_now` runs a fixed
  sample of augmented training images in train mode, BN statistics untouched). Not the loop's EMA:
  when routes move fast -- a warm start's routers opened within epoch 1 -- the EMA lags them, and
  the lag read as a val/train bias clipped rho to 1.25 where the true ratio was 1.04, which drove mu
  from 0.07 to 3 in the next epoch and closed the network to 21 % of a 30 % target
  (docs/notes/2026-12-02-landing.md, "Warm starts at 30 %: the loop read a lag as a bias"). rho is their
  ratio, averaged over epochs (EMA 0.5, clipped to
  [0.8, 1.25]), and the loop steers rho * cost, its estimate of the val cost. Val carries no labels
  here: the loop reads the FLOPs the val routes take, as the trim does.
* the scale grows with depth (the trainer passes mu_scale = 0.05 * max(1, blocks / 9), and the clips
  100 and -20 times it): Eq. 8 is one share split over all blocks, so a router's pull is ~ mu /
  blocks. With ResNet-20's scale on ResNet-56 (27 blocks) the loop needed 3x the mu, reached
  -0.12 of it in 6 epochs and left val 7 % under a 50 % target; scaled, each router of any depth
  feels what a ResNet-20 router feels at the same u (docs/notes/2026-12-01-landing.md, "ResNet-56
  lands: the loop's scale grows with depth").
* conditional integration (TrainConfig.mu_integral = hold; not the default):
  the integral holds while the routes are on course -- the error, run on at its rate over the
  last quarter epoch, crosses 0 within one epoch. The routers integrate mu themselves (their
  logits sum its gradient), so a plain integral keeps winding while the routes already move and
  overshoots: from a warm start the trained blocks pulled the routers open in epoch 1 (42 % of
  full against 30 %), mu reached 1.6 and the routes fell to 25 %, where closed routers reopen
  only slowly. A first rule held whenever |error| shrank at all: it landed those starts at
  -2.5 / -4.1 % (plain: -6.1 / -10.2 %), but on a flat cost half the noisy steps "shrink", the
  integral wound at half speed, and a scratch run stuck at 62 % missed its 70 % target by -11 %
  (docs/notes/2026-12-02-landing.md, "A held integral for the wind-up"); the horizon keeps the hold to real approaches.
* reset at the crossing (TrainConfig.mu_integral = reset, the default): the
  integral goes back to 0 when the routes stand more than 1 % over the target while mu < 0 still
  pulls them up. Routers that closed under a high target early need a strongly negative mu to
  reopen (bounding it at -0.2 or halving ki left ResNet-20 at 70 % 11-13 % short); they crossed the
  target only after the lr had decayed, and the wound-up integral, which unwinds at ki x error per
  epoch in asinh space, kept them opening to +5.3 % (BENCHMARKS.md, "The loop's integral resets at the crossing:
  ResNet-20 lands 18 of 18, ResNet-56 6 of 6").
* anti-windup: the integral is clamped so that it never pushes mu past a clip.
* the start value: 0.05 (the paper's), but WARM_MU x mu_scale (1 on ResNet-20) when the routers
  start on the budget over trained blocks (--init). A trained block's router moves only at mu ~1-3
  (the cross-entropy it saves is large); from 0.05 the loop, at ki 16, got there in the third or
  fourth epoch of a 5-epoch fine-tune, after the lr had decayed at 60 %, and at 70 % on ResNet-20
  the route stayed a block over the target (+9.6 %) for some loss weights under any mu up to the
  clip. Started at 1 it lands 70 % within 2 main epochs at the same weights (BENCHMARKS.md, "The 70 % miss,
  found: the loop started too low for trained blocks (fix: μ starts at 1 from a backbone)").
* no target: mu stays at its initial value.

The loop should land the routers on the target at Eq. 11's threshold 0.5 by itself; the trim
(calibrate.py) may only correct what is left inside [0.4, 0.6], and reports a miss beyond it.
"""
import math
from dataclasses import asdict, dataclass

import torch

WARM_MU = 20.0   # x mu_scale: the loop's start mu over trained blocks (1 on ResNet-20; see above)
ENLIST = 0.01    # RateHold.steer enlists a decided router only for a gap over 1 % of the target: a route
                 # that lands within it keeps every decided block as it is


@dataclass
class MuController:
    target: float | None = None   # cost per image (FLOPs, or ms for latency tables); None = fixed mu
    mu: float = 0.05              # current weight of Eq. 8 (initial value until the first update)
    kp: float = 1.0               # proportional gain on log mu, per unit relative error
    ki: float = 2.0               # integral gain on log mu, per epoch per unit relative error
    steps_per_epoch: int = 1
    ema_decay: float = 0.9        # smoothing of the measured hard cost, per step
    mu_min: float = -1.0          # < 0: the loop may reward compute to reach a target from below
    mu_max: float = 5.0           # Eq. 8 is normalised to [0, 1]: mu = 5 already outweighs the CE
    mu_scale: float = 0.05        # mu changes relatively above this size, linearly below
    ramp_steps: int = 0           # the setpoint moves linearly from the first measured cost to
                                  # the target over this many steps (0: the target from the start)
    max_error: float = 0.5        # |relative error| fed to the loop is clipped to this
    rho: float = 1.0              # val cost / training-batch cost, from `observe_val` (1 until then)
    rho_decay: float = 0.5        # EMA of log rho over epochs
    rho_clip: float = 1.25        # rho stays in [1 / clip, clip]
    val_seen: int = 0
    hold: bool = False            # conditional integration: the integral holds while the routes are on course
    reset: bool = False           # the integral returns to 0 when the routes cross over the target with mu < 0
    err_slow: float | None = None # the relative error smoothed over a quarter epoch (trend reference)
    mu0: float | None = None      # set on the first update
    integral: float = 0.0
    cost_ema: float | None = None
    start_cost: float | None = None
    steps: int = 0

    @property
    def setpoint(self) -> float | None:
        if self.target is None or self.start_cost is None or self.steps >= self.ramp_steps:
            return self.target
        frac = self.steps / self.ramp_steps
        return self.start_cost + frac * (self.target - self.start_cost)

    def update(self, cost_hard: float) -> float:
        """Feed the mean hard-routed cost per image of one training batch; returns the new mu."""
        self.cost_ema = cost_hard if self.cost_ema is None else (
            self.ema_decay * self.cost_ema + (1 - self.ema_decay) * cost_hard)
        if self.target is None:
            return self.mu
        if self.mu0 is None:
            self.mu0, self.start_cost = self.mu, max(self.cost_ema, self.target)
        self.steps += 1
        raw = self.rho * self.cost_ema / self.setpoint - 1.0
        err = min(max(raw, -self.max_error), self.max_error)
        if self.err_slow is None:
            self.err_slow = raw
        # hold while the routes are on course: the error, run on at its rate over the last quarter
        # epoch (raw - err_slow ~ rate x S/4 steps), crosses 0 within one epoch
        closing = raw * (raw + 4.0 * (raw - self.err_slow)) < 0
        self.err_slow += min(1.0, 4.0 / max(self.steps_per_epoch, 1)) * (raw - self.err_slow)
        u = lambda mu: math.asinh(mu / self.mu_scale)
        lo, hi = u(self.mu_min), u(self.mu_max)
        base = u(self.mu0) + self.kp * err
        if self.reset and raw > 0.01 and self.mu < 0:   # over the target, and mu still pulls the routes up
            self.integral = 0.0
        integral = self.integral + (0.0 if self.hold and closing else self.ki / max(self.steps_per_epoch, 1) * err)
        self.integral = min(max(integral, lo - base), hi - base)  # anti-windup: never past a clip
        self.mu = self.mu_scale * math.sinh(base + self.integral)
        return self.mu

    def observe_val(self, val_cost: float, train_cost: float | None = None) -> None:
        """The val images' mean hard cost, measured now (eval mode), and what training batches cost
        at the same moment (train mode; None: the loop's EMA, which lags the routes when they move
        fast): updates rho with their ratio."""
        ref = train_cost if train_cost else self.cost_ema
        if self.target is None or not ref or val_cost <= 0:
            return
        ratio = min(max(val_cost / ref, 1 / self.rho_clip), self.rho_clip)
        d = self.rho_decay if self.val_seen else 0.0
        self.rho = math.exp(d * math.log(self.rho) + (1 - d) * math.log(ratio))
        self.val_seen += 1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def controller_for(cfg, target: float | None, num_blocks: int, steps_per_epoch: int, warm: bool) -> MuController:
    """The budget loop of a run (cfg: a TrainConfig). Eq. 8 splits one share over the blocks, so a
    router's pull is ~ mu / blocks: the loop's range grows with depth, so that a router of ResNet-56
    feels what one of ResNet-20 does (never below ResNet-20's 0.05: the loop was measured there and
    deeper). warm: the routers start on the budget over trained blocks (--init), and mu starts at
    WARM_MU x mu_scale, not 0.05 (the start value above)."""
    mu_scale = cfg.mu_scale or 0.05 * max(1.0, num_blocks / 9)
    mu = cfg.mu if cfg.mu is not None else WARM_MU * mu_scale if warm else 0.05
    return MuController(target=target, mu=mu, kp=cfg.mu_kp, ki=cfg.mu_ki, steps_per_epoch=steps_per_epoch,
                        mu_scale=mu_scale, mu_max=100 * mu_scale, max_error=cfg.mu_max_error,
                        mu_min=-20 * mu_scale if cfg.mu_min is None else cfg.mu_min,
                        ramp_steps=round(cfg.budget_ramp * cfg.epochs) * steps_per_epoch,
                        hold=cfg.mu_integral == "hold", reset=cfg.mu_integral == "reset")


@dataclass
class RateHold:
    """The finetune's rate hold: each router keeps the execution rate the main schedule left it at.

    The finetune freezes the routers and trains the blocks under hard routing, at a restarted lr.
    The routers read features those blocks compute, so a frozen router's decisions drift: on
    ResNet-56 at 50 % two undecided blocks ran on 38 / 84 % of the val images when the main phase
    ended (threshold 0.5) and on 27 / 70 % after two finetune epochs, at the lower trimmed threshold
    0.400; the model fell from -2.4 % to -6.2 % of its target at 0.5 (BENCHMARKS.md, "The finetune
    holds the routers' rates: ResNet-56 lands 3 of 3"). The hold re-centres each undecided router on the moving features:
    after every finetune step its logit gap d = R_0 - R_1 moves (Router.shift_, the last layer's
    bias) by `gain` times the distance between the threshold's gap and the batch's (1 - ref)
    quantile of d, the gap above which a share ref of the images runs the block. The router's
    function of the image is kept, only its centre follows; which images run stays its choice.
    ref: the rates at the start of the finetune, on training images in train mode, at the
    threshold the finetune runs (Trainer.batch_gates_now); a block within `edge` of 0 or 1 is
    decided and is not held. The steps stay on the device (no host sync)."""
    ref: list[float] | None = None     # per-block execution rate to hold
    gain: float = 0.1                  # share of the gap to the on-rate centre closed per step
    edge: float = 0.02
    shift: list[float] | None = None   # the total shift of each router's logit gap so far (reported)
    held: list[bool] | None = None     # the blocks undecided at the start: the only ones held or steered

    def start(self, rates) -> None:
        self.ref = [float(r) for r in rates]
        self.shift = [0.0] * len(self.ref)
        self.held = [self.edge < r < 1 - self.edge for r in self.ref]

    def steer(self, cost: float, target: float, block_cost) -> None:
        """The budget loop, carried into the finetune: move the held rates so that the measured cost
        (the val images' hard cost, once per epoch) meets the target. A short main phase ends before
        the mu loop has landed (BENCHMARKS.md, "The finetune steers to the budget"); the finetune's
        epochs finish the landing on the routers' own biases, at the routers' threshold. The cost gap
        is shared by the held blocks in proportion to r (1 - r) of their rates, so a block near 0 or 1
        moves least; each rate stays inside [edge, 1 - edge]. When the held blocks cannot close the gap
        (a main phase that left every router decided), the decided block that can, the cheapest such,
        is held too (for a gap over ENLIST of the target): its router opens (or closes) on the images it
        scores highest (lowest)."""
        self._sync()
        need = self._share(target - cost, block_cost)
        while abs(need) > ENLIST * target:
            side = [i for i, (r, h) in enumerate(zip(self.ref, self.held))
                    if not h and (r <= self.edge if need > 0 else r >= 1 - self.edge)]
            if not side:
                return
            fits = [i for i in side if block_cost[i] * (1 - 2 * self.edge) >= abs(need)]
            i = min(fits, key=lambda j: block_cost[j]) if fits else max(side, key=lambda j: block_cost[j])
            self.held[i] = True
            self.ref[i] = min(1 - self.edge, max(self.edge, self.ref[i]))
            need = self._share(need, block_cost)

    def _share(self, need: float, block_cost) -> float:
        """Move the held rates by a cost of `need` (sum_b dr_b c_b, dr_b = step r_b (1 - r_b)), refilling
        what the blocks that reach an edge leave; returns the part no held rate could take."""
        for _ in range(len(self.ref)):
            free = [i for i, (r, h) in enumerate(zip(self.ref, self.held))
                    if h and (r < 1 - self.edge if need > 0 else r > self.edge)]
            w = sum(self.ref[i] * (1 - self.ref[i]) * block_cost[i] for i in free)
            if not free or w <= 0 or need == 0:
                break
            step = need / w
            for i in free:
                r = self.ref[i]
                new = min(1 - self.edge, max(self.edge, r + step * r * (1 - r)))
                need -= (new - r) * block_cost[i]
                self.ref[i] = new
        return need

    def _sync(self) -> None:
        """Bring the device-side totals back to `shift`, so that the next update rebuilds from the fields."""
        if self.held is None and self.ref is not None:   # a state saved before `held` was kept
            self.held = [self.edge < r < 1 - self.edge for r in self.ref]
        if getattr(self, "_total", None) is not None:
            self.shift = self._total.tolist()
        self._dev = None

    def update(self, d: torch.Tensor, d_t: float) -> torch.Tensor:
        """d (B, n): this batch's logit gaps (router.logit_gap of r); d_t: the gap at the threshold
        the routes run at. Returns each router's shift (n,) on d's device, 0 for a decided block."""
        if getattr(self, "_dev", None) != (d.device, d.dtype):
            ref = torch.tensor(self.ref, device=d.device, dtype=d.dtype)
            self._sync()
            self._held = torch.tensor(self.held, device=d.device)
            self._pos = (1 - ref) * (d.shape[0] - 1)
            self._total = torch.tensor(self.shift, device=d.device, dtype=d.dtype)
            self._dev, self._batch = (d.device, d.dtype), d.shape[0]
        pos = self._pos if d.shape[0] == self._batch else self._pos / (self._batch - 1) * (d.shape[0] - 1)
        lo = pos.floor().long()
        w = pos - lo
        s = d.sort(dim=0).values
        col = torch.arange(d.shape[1], device=d.device)
        q = s[lo, col] * (1 - w) + s[(lo + 1).clamp(max=d.shape[0] - 1), col] * w   # torch.quantile, per column
        delta = torch.where(self._held, self.gain * (d_t - q), torch.zeros_like(q))
        self._total += delta
        return delta

    def state_dict(self) -> dict:
        self._sync()
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._dev, self._total = None, None
