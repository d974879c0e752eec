"""Golden values: today's numbers of tiny float64 runs of every command, pinned as literals.

The other tests compare a fast path with its slow twin (vmap vs loop engine, vectorised vs one-unit GT,
exact estimate vs finite differences). A change that moves both twins together passes them all; these
tests catch it. Each run goes through the real `dice` CLI in-process, once per module (the fixture below),
under a temporary directory. Values are compared with a relative tolerance of 1e-9 (absolute 1e-12 near 0):
tight enough that any semantic change fails, loose enough for BLAS reordering on another CPU (measured:
training with threads=2 moves the detect z-scores by 2e-12 relative, everything else by < 1e-15). A pinned
0.0 is a structural zero (a target the unit cannot reach yet, the null unit's noise floor) and must stay
exactly 0. Integers, strings and flags must match exactly.

If a change is *meant* to move the numbers, say so in the commit and re-pin:
    PYTHONPATH=$PWD python tests/test_golden.py new.py   # writes EXPECTED for today's code to new.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pandas as pd
import pytest
import torch

from dice_cli import cli

RTOL, ATOL = 1e-9, 1e-12

TINY = ["nodes=4", "rounds=6", "batch_size=8", "progress=false", "dtype=float64"]
SELECTION = ["hops=2", "rounds=2", "progress=false"]          # gt / estimate: round 2, two hops
SAMPLES = [*SELECTION, "unit=sample", "samples=2"]            # two seeded samples per source batch
ROWS_RING = [(0, 0, 0), (0, 1, 1), (0, 3, 1), (0, 2, 1), (3, 0, 1), (1, 3, 2), (2, 2, 2), (3, 1, 2)]
ROWS_EXP = [(0, 0, 0), (0, 1, 1), (0, 2, 1), (0, 3, 1), (2, 0, 1), (1, 0, 2), (3, 3, 2)]  # 4-node exponential


# --- what each pinned value is ------------------------------------------------------------------------
def train_values(run: Path) -> Dict[str, object]:
    """Final-round metrics per node and a few entries / norms of the final checkpoint."""
    m = pd.read_csv(run / "metrics.csv")
    last = m[m["round"] == m["round"].max()].sort_values("node")
    ck = sorted((run / "checkpoints").iterdir())[-1]
    state = torch.load(ck, weights_only=True)
    theta = state["theta"]
    p = theta.shape[1]
    v: Dict[str, object] = {
        "final checkpoint": ck.name,
        "probe_loss": last["probe_loss"].tolist(),
        "train_loss": last["train_loss"].tolist(),
        "consensus_distance": last["consensus_distance"].tolist(),
        "theta[:, 0]": theta[:, 0].tolist(),
        f"theta[:, {p // 2}]": theta[:, p // 2].tolist(),
        f"theta[:, {p - 1}]": theta[:, p - 1].tolist(),
        "|theta_k|": theta.norm(dim=1).tolist(),
    }
    if state.get("momentum") is not None:
        v["|momentum_k|"] = state["momentum"].norm(dim=1).tolist()
    for name, buf in sorted(state.get("buffers", {}).items()):
        if buf.is_floating_point():
            v[f"sum {name}"] = buf.sum(dim=1).tolist()
    return v


def influence_values(rows: List[tuple]) -> Callable[[Path], Dict[str, object]]:
    """Chosen rows (source, target, hop) of influence.csv — every unit of that source, in table order —
    the sum of |influence| per hop, and for gt the two losses of one row and the noise floor."""
    def measure(out: Path) -> Dict[str, object]:
        df = pd.read_csv(out / "influence.csv")
        v: Dict[str, object] = {"rows": len(df), "rounds": sorted(set(df["round"].tolist()))}
        if (df["unit"] == "sample").all():
            v["samples"] = {int(s): g["sample"].unique().tolist() for s, g in df.groupby("source")}
        for s, t, h in rows:
            sel = df[(df.source == s) & (df.target == t) & (df.hop == h)]
            assert len(sel) > 0, (s, t, h)
            v[f"source {s} -> target {t}, hop {h}"] = sel["influence"].tolist()
        for h, g in df.groupby("hop"):
            v[f"sum |influence| hop {h}"] = float(g["influence"].abs().sum())
        if "loss_with" in df:
            first = df.iloc[0]
            v["row 0 loss_with, loss_without"] = [float(first.loss_with), float(first.loss_without)]
            v["null_unit_max_abs_gt"] = json.loads((out / "summary.json").read_text())[
                "noise_floor"]["null_unit_max_abs_gt"]
        if (out / "alignment.json").exists():
            overall = json.loads((out / "alignment.json").read_text())["overall"]
            for key in ["spearman", "pearson", "sign_agreement"]:
                v[f"alignment {key}"] = overall[key]
        return v
    return measure


def detect_values(out: Path) -> Dict[str, object]:
    """Every sender's network-wide score, two receiver-sender window sums, ROC AUC / AP and the flags."""
    senders = pd.read_csv(out / "senders.csv").sort_values("sender")
    pairs = pd.read_csv(out / "pairs.csv")
    summary = json.loads((out / "summary.json").read_text())
    v: Dict[str, object] = {"sender scores": senders["score"].tolist(), "flagged": summary["flagged"]}
    for k, l in [(0, 1), (2, 1)]:
        p = pairs[(pairs.receiver == k) & (pairs.sender == l)]
        if len(p):
            v[f"pair {l}->{k} proximal_influence, dot"] = [float(p["proximal_influence"].iloc[0]),
                                                           float(p["dot"].iloc[0])]
    for key in ["roc_auc", "average_precision"]:
        if summary.get(key) is not None:
            v[key] = summary[key]
    return v


# --- the runs: name -> (dice arguments, runs it needs, what is pinned) -------------------------------------
STEPS = {
    "sgd_ring": (["train", *TINY, "out=sgd_ring"], [], train_values),
    "mom_exp": (["train", *TINY, "topology=exponential", "optim=momentum", "out=mom_exp"], [], train_values),
    "mom_exp_loop": (["train", *TINY, "topology=exponential", "optim=momentum", "engine=loop",
                      "out=mom_exp_loop"], [], train_values),
    "cnn_bn": (["train", *TINY, "model=cnn_bn", "out=cnn_bn"], [], train_values),
    "logreg": (["train", *TINY, "model=logreg", "lr=0.2", "out=logreg"], [], train_values),
    "attacked": (["train", "nodes=8", "rounds=10", "batch_size=8", "progress=false", "dtype=float64",
                  "topology=exponential", "attack=label_flip", "attack.nodes=[1]", "out=attacked"],
                 [], train_values),
    "gt_batch": (["gt", "run=sgd_ring", *SELECTION, "out=gt_batch"], ["sgd_ring"], influence_values(ROWS_RING)),
    "gt_sample": (["gt", "run=sgd_ring", *SAMPLES, "out=gt_sample"], ["sgd_ring"], influence_values(ROWS_RING)),
    "gt_mom": (["gt", "run=mom_exp", *SELECTION, "out=gt_mom"], ["mom_exp"], influence_values(ROWS_EXP)),
    "fo_batch": (["estimate", "run=sgd_ring", *SELECTION, "method=first_order", "gt=gt_batch", "out=fo_batch"],
                 ["gt_batch"], influence_values(ROWS_RING)),
    "exact_batch": (["estimate", "run=sgd_ring", *SELECTION, "method=exact", "gt=gt_batch", "out=exact_batch"],
                    ["gt_batch"], influence_values(ROWS_RING)),
    "fo_sample": (["estimate", "run=sgd_ring", *SAMPLES, "method=first_order", "gt=gt_sample", "out=fo_sample"],
                  ["gt_sample"], influence_values(ROWS_RING)),
    "exact_sample": (["estimate", "run=sgd_ring", *SAMPLES, "method=exact", "gt=gt_sample",
                      "out=exact_sample"], ["gt_sample"], influence_values(ROWS_RING)),
    "exact_mom": (["estimate", "run=mom_exp", *SELECTION, "method=exact", "gt=gt_mom", "out=exact_mom"],
                  ["gt_mom"], influence_values(ROWS_EXP)),
    "detect": (["detect", "run=attacked", "progress=false", "out=detect"], ["attacked"], detect_values),
    "detect_dot": (["detect", "run=attacked", "score=dot", "normalize=none", "progress=false", "out=detect_dot"],
                   ["attacked"], detect_values),
    "detect_ring": (["detect", "run=sgd_ring", "progress=false", "out=detect_ring"], ["sgd_ring"], detect_values),
}


def _dice(cwd: Path, *args: str) -> None:
    """`dice ARGS` in-process with cwd set to `cwd`; restores cwd and argv; fails on a non-zero exit."""
    old_cwd, old_argv = os.getcwd(), list(sys.argv)
    code = 0
    os.chdir(cwd)
    try:
        cli.main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
    if code != 0:
        raise RuntimeError(f"`dice {' '.join(args)}` exited {code}")


class Runs:
    """Builds each step (and the steps it needs) once, on first use, under one directory."""

    def __init__(self, root: Path):
        self.root, self.done = root, set()

    def values(self, name: str) -> Dict[str, object]:
        args, deps, measure = STEPS[name]
        for d in deps:
            if d not in self.done:
                self.values(d)
        if name not in self.done:
            _dice(self.root, *args)
            self.done.add(name)
        return measure(self.root / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("golden"))


def _mismatches(actual, expected, where: str = "") -> List[str]:
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            return [f"{where}: keys {sorted(actual) if isinstance(actual, dict) else actual!r} "
                    f"!= {sorted(expected)}"]
        return [m for k in expected for m in _mismatches(actual[k], expected[k], f"{where}[{k!r}]")]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: {actual!r} != {expected!r}"]
        return [m for i, (a, e) in enumerate(zip(actual, expected)) for m in _mismatches(a, e, f"{where}[{i}]")]
    if isinstance(expected, float):  # a pinned 0.0 is a structural zero (unreachable target, null unit): exact
        ok = isinstance(actual, (int, float)) and (actual == 0.0 if expected == 0.0 else
                                                   bool(np.isclose(actual, expected, rtol=RTOL, atol=ATOL)))
        return [] if ok else [f"{where}: got {actual!r}, pinned {expected!r}"]
    return [] if actual == expected else [f"{where}: got {actual!r}, pinned {expected!r}"]


def check(runs: Runs, name: str, expected_name: str = None) -> None:
    bad = _mismatches(runs.values(name), EXPECTED[expected_name or name], name)
    assert not bad, f"{len(bad)} golden value(s) moved:\n" + "\n".join(bad)


# --- the tests -----------------------------------------------------------------------------------------
def test_train_plain_sgd_ring(runs):
    """Plain SGD, default MLP, 4-node ring: the MLP fast path (hand-written forward/backward) and gossip."""
    check(runs, "sgd_ring")


def test_train_momentum_weight_decay_exponential(runs):
    """optim=momentum (0.9, weight decay 5e-4, cosine lr) on the directed exponential graph: momentum
    buffer, decay term, schedule and a non-symmetric W."""
    check(runs, "mom_exp")


def test_train_loop_engine_gives_the_same_pinned_numbers(runs):
    """engine=loop (per-node nn.Module + torch.optim.SGD) against the vmap run's literals: the slow twin is
    pinned too, so a change to both engines together is caught."""
    check(runs, "mom_exp_loop", "mom_exp")


def test_train_cnn_batchnorm(runs):
    """model=cnn_bn: the general vmap + autograd path, BatchNorm running statistics and their gossip."""
    check(runs, "cnn_bn")


def test_train_logreg(runs):
    """model=logreg at lr=0.2: the other model on the fast path, with a non-default learning rate."""
    check(runs, "logreg")


def test_train_label_flip_attack(runs):
    """attack=label_flip on node 1 of an 8-node exponential graph, 10 rounds: the data attack's effect on
    training (this run is also the one dice detect scores)."""
    check(runs, "attacked")


def test_gt_batch_units(runs):
    """dice gt, batch units of round 2, two hops, on the ring run: the counterfactual re-simulation, chosen
    rows (including an exact 0 where node 0 cannot reach node 2 in one hop), the losses, sum |GT| per hop,
    and a noise floor of exactly 0."""
    check(runs, "gt_batch")


def test_gt_sample_units(runs):
    """dice gt unit=sample samples=2: which samples the seeded subset picks, and their GT rows."""
    check(runs, "gt_sample")


def test_gt_with_momentum(runs):
    """dice gt on the momentum / weight-decay / exponential run: the re-simulation carries momentum."""
    check(runs, "gt_mom")


def test_estimate_first_order_batch_units(runs):
    """dice estimate method=first_order on gt_batch's selection: rows, sum per hop, alignment overall."""
    check(runs, "fo_batch")


def test_estimate_exact_batch_units(runs):
    """dice estimate method=exact (curvature kept) on gt_batch's selection: rows, sum per hop, alignment."""
    check(runs, "exact_batch")


def test_estimate_first_order_sample_units(runs):
    """first_order on gt_sample's selection: per-sample deltas and their alignment with GT."""
    check(runs, "fo_sample")


def test_estimate_exact_sample_units(runs):
    """exact on gt_sample's selection: the reverse-mode derivative for every sample weight."""
    check(runs, "exact_sample")


def test_estimate_exact_with_momentum(runs):
    """exact on the momentum run (derivative through the momentum buffer and weight decay), vs gt_mom."""
    check(runs, "exact_mom")


def test_detect_proximal_influence(runs):
    """dice detect (defaults: proximal influence, receiver z-scores, mean) on the attacked run: every
    sender's score, two pair window sums (raw proximal influence and dot), ROC AUC / AP and the flags."""
    check(runs, "detect")


def test_detect_dot_unnormalized(runs):
    """dice detect score=dot normalize=none: the paper code's raw score, aggregated without z-scores."""
    check(runs, "detect_dot")


def test_detect_ring_without_attack(runs):
    """dice detect on the unattacked ring: receivers with two in-neighbours take the magnitude-keeping
    normalisation instead of z-scores; no ROC (no attack record)."""
    check(runs, "detect_ring")


# Pinned on CPU (torch 2.14.1+cu130, 1 intra-op thread: threads=auto for these sizes) from commit d6818e7.
EXPECTED: Dict[str, Dict[str, object]] = {'sgd_ring': {'final checkpoint': 'round_000006.pt',
              'probe_loss': [2.2808686074857247, 2.2805455584738055, 2.277469813216377, 2.276307046067177],
              'train_loss': [2.302749322687431, 2.2673132039834556, 2.2887127315757247, 2.31979175344708],
              'consensus_distance': [0.0006477833241050402,
                                     0.0004577719695963065,
                                     0.0005225580079267393,
                                     0.0005077299990938173],
              'theta[:, 0]': [-0.006828050637339015,
                              -0.006638880312859282,
                              -0.006464239577457927,
                              -0.006879203851050876],
              'theta[:, 1205]': [-0.06537496828087992,
                                 -0.06606813203082454,
                                 -0.06621553588235053,
                                 -0.06567905960115997],
              'theta[:, 2409]': [-0.033814497062085655,
                                 -0.030289650398192702,
                                 -0.02531770770201295,
                                 -0.027296446952225367],
              '|theta_k|': [1.881424368011307, 1.88218317260788, 1.8812430657321781, 1.880747369652722]},
 'mom_exp': {'final checkpoint': 'round_000006.pt',
             'probe_loss': [2.283941887418117, 2.2835026601573833, 2.2842944458726255, 2.2833676329544845],
             'train_loss': [2.295403761332743, 2.265491764617396, 2.2949946002042303, 2.3503517757157137],
             'consensus_distance': [7.247126990735934e-05,
                                    7.331551241445119e-05,
                                    8.886541030576638e-05,
                                    7.570725046621564e-05],
             'theta[:, 0]': [-0.006046294345161138,
                             -0.0064554977536372465,
                             -0.006097521753860068,
                             -0.006222070130283335],
             'theta[:, 1205]': [-0.07173019998276402,
                                -0.07183866485180597,
                                -0.07172823003901488,
                                -0.07208642173600942],
             'theta[:, 2409]': [-0.035551205842692994,
                                -0.034360011563637924,
                                -0.03551773599346085,
                                -0.03365381939505146],
             '|theta_k|': [1.8898474469582107, 1.889927824700094, 1.8901203173995347, 1.8897904262278762],
             '|momentum_k|': [2.0763426974488444,
                              1.8774803080279607,
                              1.9673575397524303,
                              2.0984537046303307]},
 'cnn_bn': {'final checkpoint': 'round_000006.pt',
            'probe_loss': [2.2156472993185052, 2.203932165232227, 2.1980433716302143, 2.198641015403324],
            'train_loss': [2.618569037186471, 2.206102065824579, 2.2651294730239577, 2.118921142239973],
            'consensus_distance': [0.03354392833731378,
                                   0.014178351949121861,
                                   0.02893797644547035,
                                   0.034705049433303305],
            'theta[:, 0]': [-0.03299688163985269,
                            -0.03868296311912155,
                            -0.039519557685365116,
                            -0.03970372339370002],
            'theta[:, 3093]': [0.005164706539305937,
                               0.008285877950960172,
                               0.008560681613925307,
                               0.006437889051398426],
            'theta[:, 6185]': [0.019587970485718,
                               0.02391421563471623,
                               0.026921212033619066,
                               0.026897461482483263],
            '|theta_k|': [7.257369133220298, 7.253373118813218, 7.258964864125806, 7.26047429972736],
            'sum 1.running_mean': [-0.11741485211386786,
                                   -0.11570562866466286,
                                   -0.11651781134596328,
                                   -0.11583209558395038],
            'sum 1.running_var': [9.261610159461767, 9.259968078282398, 9.260809659512956, 9.261615315016751],
            'sum 5.running_mean': [-1.3395598518260756,
                                   -1.3349517099027748,
                                   -1.3388180584547447,
                                   -1.3289781119477986],
            'sum 5.running_var': [18.359837584581065,
                                  18.3665208534754,
                                  18.368287235501647,
                                  18.369969066610018]},
 'logreg': {'final checkpoint': 'round_000006.pt',
            'probe_loss': [1.2874458512208624, 1.289836813953277, 1.2560404262747304, 1.2173291477194914],
            'train_loss': [1.379789680516642, 1.2881281526345152, 1.4214289467563639, 1.4853058271356707],
            'consensus_distance': [0.017378401190353415,
                                   0.014661318242591037,
                                   0.01699039685408054,
                                   0.018098932593441266],
            'theta[:, 0]': [0.004974348669728981,
                            0.00020911837030125963,
                            0.0010415469985440174,
                            -0.0007122589499930668],
            'theta[:, 325]': [0.10194642996528251,
                              0.08276564287537197,
                              0.0818689937313033,
                              0.07837972462428579],
            'theta[:, 649]': [-0.008109681266944871,
                              -0.0030780303273944053,
                              0.0032832464015525543,
                              0.0017782072999793699],
            '|theta_k|': [1.5648250185419634, 1.5605650930625172, 1.5595206958128645, 1.5612868105999183]},
 'attacked': {'final checkpoint': 'round_000010.pt',
              'probe_loss': [2.277912686813605,
                             2.280447644457533,
                             2.2799584369918393,
                             2.28039834638005,
                             2.27814073540359,
                             2.2796188197974954,
                             2.2775993371402614,
                             2.276986157412048],
              'train_loss': [2.2623358698084393,
                             2.271782500538465,
                             2.294631184755839,
                             2.2783506152542947,
                             2.3024865187077865,
                             2.2717586179528535,
                             2.2768747272051035,
                             2.2863527557215457],
              'consensus_distance': [0.0005413988472026479,
                                     0.000376247048413765,
                                     0.0003622504991495338,
                                     0.00040830672457481014,
                                     0.00040679481224514515,
                                     0.0003214028783466447,
                                     0.00030973009748310083,
                                     0.0005237442230202249],
              'theta[:, 0]': [0.010392258709552665,
                              0.010128452321044394,
                              0.010197296740181752,
                              0.009932286936331199,
                              0.010082730882054115,
                              0.010081180642395432,
                              0.01031562612877256,
                              0.010237544030146898],
              'theta[:, 1205]': [-0.02958085649832761,
                                 -0.029748004496343898,
                                 -0.029597092610582954,
                                 -0.02953297133051524,
                                 -0.029400370209873062,
                                 -0.02937767884206588,
                                 -0.029378754809570043,
                                 -0.029578725268221362],
              'theta[:, 2409]': [-0.01788495622913394,
                                 -0.024881825649697566,
                                 -0.019653785745379026,
                                 -0.022870570237826807,
                                 -0.021222860850746206,
                                 -0.022143708565054328,
                                 -0.022479284598131827,
                                 -0.025734272045399482],
              '|theta_k|': [1.3435923283711269,
                            1.3431120010638073,
                            1.3437110424671967,
                            1.342699236914526,
                            1.3436012529509487,
                            1.3426491752019467,
                            1.3429380359600969,
                            1.3435239598659763]},
 'gt_batch': {'rows': 36,
              'rounds': [2],
              'source 0 -> target 0, hop 0': [-0.007062749893648412],
              'source 0 -> target 1, hop 1': [-0.0024033415684994175],
              'source 0 -> target 3, hop 1': [-0.0021479357961635692],
              'source 0 -> target 2, hop 1': [0.0],
              'source 3 -> target 0, hop 1': [-0.0008385856748605036],
              'source 1 -> target 3, hop 2': [-0.0036668629024698696],
              'source 2 -> target 2, hop 2': [5.153268904178887e-05],
              'source 3 -> target 1, hop 2': [-0.0008029114359557887],
              'sum |influence| hop 0': 0.0244967539111558,
              'sum |influence| hop 1': 0.026096049636896268,
              'sum |influence| hop 2': 0.028155311402178196,
              'row 0 loss_with, loss_without': [2.302349492077626, 2.3094122419712746],
              'null_unit_max_abs_gt': 0.0},
 'gt_sample': {'rows': 72,
               'rounds': [2],
               'samples': {0: [1171, 597], 1: [440, 66], 2: [1284, 174], 3: [495, 162]},
               'source 0 -> target 0, hop 0': [-0.00019710064173894537, -0.0013799038405228892],
               'source 0 -> target 1, hop 1': [-4.4909887042532404e-05, -0.00040525813149372425],
               'source 0 -> target 3, hop 1': [-2.9692468464403987e-05, -0.0004252349993265625],
               'source 0 -> target 2, hop 1': [0.0, 0.0],
               'source 3 -> target 0, hop 1': [-0.00011032498749585784, -0.0002554494083075731],
               'source 1 -> target 3, hop 2': [-0.0010240118010820254, -0.00011523675366653663],
               'source 2 -> target 2, hop 2': [2.939021375159001e-06, 0.00015136703185536504],
               'source 3 -> target 1, hop 2': [-9.162455477174092e-05, -0.0002134620444786961],
               'sum |influence| hop 0': 0.008101064120435542,
               'sum |influence| hop 1': 0.008117491858758541,
               'sum |influence| hop 2': 0.008174085080782323,
               'row 0 loss_with, loss_without': [2.302349492077626, 2.302546592719365],
               'null_unit_max_abs_gt': 0.0},
 'gt_mom': {'rows': 36,
            'rounds': [2],
            'source 0 -> target 0, hop 0': [-0.004947889986778531],
            'source 0 -> target 1, hop 1': [-0.0015856611926370334],
            'source 0 -> target 2, hop 1': [-0.0016741087603846516],
            'source 0 -> target 3, hop 1': [0.0],
            'source 2 -> target 0, hop 1': [-0.0002870263606893353],
            'source 1 -> target 0, hop 2': [-0.002314373037823003],
            'source 3 -> target 3, hop 2': [-0.0009534502596548755],
            'sum |influence| hop 0': 0.01864083520537907,
            'sum |influence| hop 1': 0.01847441107295067,
            'sum |influence| hop 2': 0.028996375876483516,
            'row 0 loss_with, loss_without': [2.294897665907224, 2.2998455558940027],
            'null_unit_max_abs_gt': 0.0},
 'fo_batch': {'rows': 36,
              'rounds': [2],
              'source 0 -> target 0, hop 0': [-0.007400669369414942],
              'source 0 -> target 1, hop 1': [-0.0023782671963431404],
              'source 0 -> target 3, hop 1': [-0.002076583188630815],
              'source 0 -> target 2, hop 1': [0.0],
              'source 3 -> target 0, hop 1': [-0.0007114245057054185],
              'source 1 -> target 3, hop 2': [-0.0037375570760619053],
              'source 2 -> target 2, hop 2': [4.412276388339685e-05],
              'source 3 -> target 1, hop 2': [-0.0006561343546585295],
              'sum |influence| hop 0': 0.027901622161100526,
              'sum |influence| hop 1': 0.02516201411261185,
              'sum |influence| hop 2': 0.025961554039054265,
              'alignment spearman': 0.9541788856304986,
              'alignment pearson': 0.9936972034605285,
              'alignment sign_agreement': 0.84375},
 'exact_batch': {'rows': 36,
                 'rounds': [2],
                 'source 0 -> target 0, hop 0': [-0.006495305586757873],
                 'source 0 -> target 1, hop 1': [-0.00237826719634314],
                 'source 0 -> target 3, hop 1': [-0.002076583188630815],
                 'source 0 -> target 2, hop 1': [0.0],
                 'source 3 -> target 0, hop 1': [-0.0007114245057054186],
                 'source 1 -> target 3, hop 2': [-0.003699317498730726],
                 'source 2 -> target 2, hop 2': [4.2466924905751986e-05],
                 'source 3 -> target 1, hop 2': [-0.0006922524370194157],
                 'sum |influence| hop 0': 0.022033630545489315,
                 'sum |influence| hop 1': 0.02516201411261185,
                 'sum |influence| hop 2': 0.026299393725962017,
                 'alignment spearman': 0.970674486803519,
                 'alignment pearson': 0.9954359449967305,
                 'alignment sign_agreement': 0.875},
 'fo_sample': {'rows': 72,
               'rounds': [2],
               'samples': {0: [1171, 597], 1: [440, 66], 2: [1284, 174], 3: [495, 162]},
               'source 0 -> target 0, hop 0': [-0.00026913503656500546, -0.0013068804524382016],
               'source 0 -> target 1, hop 1': [-3.756050781083547e-05, -0.0004005923639645721],
               'source 0 -> target 3, hop 1': [-3.0125601715341467e-05, -0.00041523690152228183],
               'source 0 -> target 2, hop 1': [0.0, 0.0],
               'source 3 -> target 0, hop 1': [-9.54387302891093e-05, -0.00025957268650455244],
               'source 1 -> target 3, hop 2': [-0.0010403498683813097, -0.00011560631622479775],
               'source 2 -> target 2, hop 2': [3.569534534415348e-05, 0.0001717583981023841],
               'source 3 -> target 1, hop 2': [-7.064978077056422e-05, -0.0001690760137368061],
               'sum |influence| hop 0': 0.008328689743296942,
               'sum |influence| hop 1': 0.00812647913653425,
               'sum |influence| hop 2': 0.008030689929237342,
               'alignment spearman': 0.9539377289377288,
               'alignment pearson': 0.9927591289278084,
               'alignment sign_agreement': 0.9375},
 'exact_sample': {'rows': 72,
                  'rounds': [2],
                  'samples': {0: [1171, 597], 1: [440, 66], 2: [1284, 174], 3: [495, 162]},
                  'source 0 -> target 0, hop 0': [-4.843327189043447e-05, -0.0013341343577915378],
                  'source 0 -> target 1, hop 1': [-3.756050781083538e-05, -0.0004005923639645721],
                  'source 0 -> target 3, hop 1': [-3.0125601715341538e-05, -0.0004152369015222818],
                  'source 0 -> target 2, hop 1': [0.0, 0.0],
                  'source 3 -> target 0, hop 1': [-9.543873028910925e-05, -0.0002595726865045525],
                  'source 1 -> target 3, hop 2': [-0.0010292311324141042, -0.00010450501908453804],
                  'source 2 -> target 2, hop 2': [3.9321796141915846e-05, 0.00017352317161246133],
                  'source 3 -> target 1, hop 2': [-6.404972483373345e-05, -0.0001869905625375886],
                  'sum |influence| hop 0': 0.008034981262186592,
                  'sum |influence| hop 1': 0.008126479136534248,
                  'sum |influence| hop 2': 0.008030775437416513,
                  'alignment spearman': 0.9930402930402931,
                  'alignment pearson': 0.998949712407677,
                  'alignment sign_agreement': 0.953125},
 'exact_mom': {'rows': 36,
               'rounds': [2],
               'source 0 -> target 0, hop 0': [-0.004756325652770279],
               'source 0 -> target 1, hop 1': [-0.0015465886995979802],
               'source 0 -> target 2, hop 1': [-0.0016359171488585784],
               'source 0 -> target 3, hop 1': [0.0],
               'source 2 -> target 0, hop 1': [-0.00023841752814821553],
               'source 1 -> target 0, hop 2': [-0.002290564710486491],
               'source 3 -> target 3, hop 2': [-0.0008872121538921502],
               'sum |influence| hop 0': 0.017447434927494277,
               'sum |influence| hop 1': 0.018072617357756435,
               'sum |influence| hop 2': 0.0283961117141239,
               'alignment spearman': 0.9886363636363635,
               'alignment pearson': 0.9986551840538531,
               'alignment sign_agreement': 1.0},
 'detect': {'sender scores': [34.565180892748025,
                              3.521686031475967,
                              0.3862550448025443,
                              -3.844234911762363,
                              -0.3910048920797952,
                              -0.9830100781527465,
                              1.1705081406698352,
                              -0.33182412481258555],
            'flagged': [0],
            'pair 1->2 proximal_influence, dot': [0.004020147009963845, -0.04249997193523955],
            'roc_auc': 0.8571428571428572,
            'average_precision': 0.5},
 'detect_dot': {'sender scores': [-0.21865437016707448,
                                  0.10199649142729302,
                                  -0.2477544964852648,
                                  -0.3260081551777847,
                                  -0.3005207389333504,
                                  -0.32843536926050937,
                                  -0.20292027098118917,
                                  -0.3989190941153336],
                'flagged': [1],
                'pair 1->2 proximal_influence, dot': [0.004020147009963845, -0.04249997193523955],
                'roc_auc': 1.0,
                'average_precision': 1.0},
 'detect_ring': {'sender scores': [-1.049882086250777,
                                   -1.2795136908558011,
                                   -1.1400310573829053,
                                   -1.4054675403498649],
                 'flagged': [],
                 'pair 1->0 proximal_influence, dot': [-0.013328787224345037, 0.30748034435242183],
                 'pair 1->2 proximal_influence, dot': [-0.012497044134839569, 0.299167830780111]}}


if __name__ == "__main__":  # write today's values in the literal form used above (for a deliberate re-pin)
    import pprint

    if len(sys.argv) != 2:
        sys.exit("usage: python tests/test_golden.py OUT.py   (the commands' logs go to stdout)")

    with tempfile.TemporaryDirectory() as d:
        r = Runs(Path(d))
        values = {name: r.values(name) for name in STEPS if name != "mom_exp_loop"}
    Path(sys.argv[1]).write_text("EXPECTED: Dict[str, Dict[str, object]] = "
                                 + pprint.pformat(values, width=110, sort_dicts=False) + "\n")
