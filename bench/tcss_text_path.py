"""Where does the prompt get lost in a trained TCSS? A one-minute probe of the text path (issue 15)

Sampling a model and scoring tumor locations (``bench/tcss_text_control.py``) says *whether* text steers the masks;
this probe says *where along the path* the prompt's content disappears, on a trained model file and a data set with
records (e.g. ``guidegen demo-data --output_dir /tmp/tc300 --num_phantoms 300 --include_example_ct false``):

1. **Is the tumor organ in the text features?** A linear classifier (multinomial logistic regression) is fitted on the
   training records' prompts and scored on the held-out ones, from (a) the frozen encoder's token features, averaged
   over real tokens, and (b) the knowledge-injection output of the deepest level (paper Eq. 3-4), averaged over the
   queries. Near 1.0: the content reaches the U-Net's door.
2. **Does the U-Net read it?** For held-out records with a tumor, the true mask is noised to step t (paper Eq. 2) and
   the network's x_0 probabilities f_theta(x_t, t, c) are compared between three prompts: the record's own, the same
   patient with the tumor in another organ (that organ's diagnosis wording from the training records), and the null
   prompt. Reported per t: ``l1_own_null`` and ``l1_own_swapped`` (mean over voxels of the L1 distance between the
   class distributions) and ``own_organ_share`` (of the tumor probability mass lying in the own or the other organ,
   the share in the own organ: under the own prompt and under the swapped one; a model that listens moves it), and
   ``tumor_voxels`` (the tumor voxels the x_0 prediction holds in expectation, the sum of its tumor probabilities:
   under the own prompt, under the same patient's "no tumor" prompt, and the true count; a model that listens draws
   less tumor for "no tumor").
3. **How much does cross-attention add?** For one case, each cross-attention block's update ``|W_o Attn(...)|``
   against its input ``|x|`` (Frobenius norms).

Usage (prints one JSON object):
    .venv/bin/python bench/tcss_text_path.py --model MODEL.pt --datalist /tmp/tc300/datalist.json
    # an unfinished run, at its epoch K: the EMA weights the trainer would export (--weights network: the raw ones)
    .venv/bin/python bench/tcss_text_path.py --checkpoint RUN/models/checkpoint_epoch=K.pt --datalist /tmp/tc300/datalist.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tcss_text_control import diagnosis_wording  # the steering prompts' organ wording (bench/ on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def linear_probe_accuracy(train_x: Any, train_y: Any, test_x: Any, test_y: Any, classes: int, steps: int = 500) -> float:
    """Held-out accuracy of an L2-regularised multinomial logistic regression on standardised features."""
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(((test_x @ weight + bias).argmax(1) == test_y).float().mean())


def text_features(pipeline: Any, prompts: Sequence[str]) -> dict[str, Any]:
    """Per prompt: the encoder's token features averaged over real tokens, and the deepest injection context's mean."""
    import torch

    features, mask = pipeline.text_encoder(list(prompts))
    with torch.no_grad():
        contexts = [c for c in pipeline.network.injector(features, mask) if c is not None]
    real = mask[..., None].to(features.dtype)
    return {"encoder_tokens_mean": (features * real).sum(1) / real.sum(1),
            "injection_deepest_mean": contexts[-1].mean(1)}


def text_content(pipeline: Any, training: Sequence[Mapping[str, Any]], held_out: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Part 1: is the tumor organ (or none) linearly readable from the text features of held-out records?"""
    import torch

    organs = sorted({str(item["record"].get("tumor_organ")) for item in training})
    def labels(items: Sequence[Mapping[str, Any]]) -> Any:
        return torch.tensor([organs.index(str(item["record"].get("tumor_organ"))) for item in items])

    known = [item for item in held_out if str(item["record"].get("tumor_organ")) in organs]
    train_f, test_f = text_features(pipeline, [i["text"] for i in training]), text_features(pipeline, [i["text"] for i in known])
    train_y, test_y = labels(training), labels(known)
    chance = max(float((test_y == c).float().mean()) for c in range(len(organs)))
    return {"classes": organs, "held_out_records": len(known), "majority_class_rate": round(chance, 3),
            **{name: round(linear_probe_accuracy(train_f[name], train_y, test_f[name], test_y, len(organs)), 3)
               for name in train_f}}


def prompt_sensitivity(pipeline: Any, class_map: Any, root: Path, training: Sequence[Mapping[str, Any]],
                       held_out: Sequence[Mapping[str, Any]], timesteps: Sequence[int], seed: int) -> dict[str, Any]:
    """Part 2: own vs swapped-organ vs null prompt on noised held-out masks."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    from custom_components.data.prompts import record_to_prompt

    network, scheduler, encoder = pipeline.network, pipeline.scheduler, pipeline.text_encoder
    network.eval()
    names, tumor = list(class_map.class_names), class_map.tumor_index
    wording = diagnosis_wording(training)
    organs = sorted(o for o in wording if o in names)
    generator = torch.Generator().manual_seed(seed)
    rows: dict[int, list[tuple[float, ...]]] = {int(t): [] for t in timesteps}
    for index, item in enumerate(held_out):
        record = item["record"]
        own = record.get("tumor_organ")
        if own not in organs:
            continue
        other = [o for o in organs if o != own][index % (len(organs) - 1)]
        healthy = dict(record, tumor_organ=None, tumor_count=0, tumor_size_mm=None, stage=None, diagnosis="no abnormality")
        prompts = [item["text"], record_to_prompt(dict(record, tumor_organ=other, diagnosis=wording[other])),
                   item["text"], record_to_prompt(healthy)]
        features, mask = encoder(prompts)
        mask = mask.bool().clone()
        mask[2] = False  # third: the null prompt
        labels = torch.as_tensor(np.asarray(nib.load(str(root / item["label"])).dataobj)).long()
        x0 = F.one_hot(labels, class_map.num_classes).permute(3, 0, 1, 2)[None].float()
        in_own, in_other = labels == names.index(own), labels == names.index(other)
        for t in timesteps:
            x_t = scheduler.q_sample(x0, int(t), generator=generator).to(torch.uint8)
            with torch.no_grad():
                probs = network(x_t.expand(4, *x_t.shape[1:]), torch.full((4,), int(t)), features, mask).float().softmax(1)
            mass = probs[:, tumor]
            share = [float(m[in_own].sum() / (m[in_own].sum() + m[in_other].sum() + 1e-8)) for m in mass[:2]]
            rows[int(t)].append((float((probs[0] - probs[2]).abs().sum(0).mean()),
                                 float((probs[0] - probs[1]).abs().sum(0).mean()), *share,
                                 float(mass[0].sum()), float(mass[3].sum()), float((labels == tumor).sum())))
    out = {}
    for t, values in rows.items():
        v = np.asarray(values)
        out[f"t{t}"] = {"cases": len(v), "l1_own_null": round(float(v[:, 0].mean()), 5),
                        "l1_own_swapped": round(float(v[:, 1].mean()), 5),
                        "own_organ_share": {"own_prompt": round(float(v[:, 2].mean()), 3),
                                            "swapped_prompt": round(float(v[:, 3].mean()), 3)},
                        "tumor_voxels": {"own_prompt": round(float(v[:, 4].mean()), 1),
                                         "no_tumor_prompt": round(float(v[:, 5].mean()), 1),
                                         "true": round(float(v[:, 6].mean()), 1)}}
    return out


def cross_attention_updates(pipeline: Any, root: Path, item: Mapping[str, Any], num_classes: int, t: int) -> dict[str, float]:
    """Part 3: |update| / |input| of every cross-attention block, on one noised case with its own prompt."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    network = pipeline.network
    ratios: dict[str, float] = {}
    hooks = []
    for name, module in network.unet.named_modules():
        if name.endswith("cross_attn"):
            def record(module: Any, inputs: Any, output: Any, name: str = name) -> None:
                ratios[name] = round(float((output - inputs[0]).norm() / inputs[0].norm()), 5)
            hooks.append(module.register_forward_hook(record))
    labels = torch.as_tensor(np.asarray(nib.load(str(root / item["label"])).dataobj)).long()
    x0 = F.one_hot(labels, num_classes).permute(3, 0, 1, 2)[None].float()
    x_t = pipeline.scheduler.q_sample(x0, t, generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    features, mask = pipeline.text_encoder([item["text"]])
    with torch.no_grad():
        network(x_t, torch.full((1,), t), features, mask)
    for hook in hooks:
        hook.remove()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a trained TCSS model file (models/model.pt)")
    source.add_argument("--checkpoint", type=Path,
                        help="a TCSS training checkpoint (models/checkpoint_epoch=K.pt), probed through the model file "
                             "the trainer would export from it (see --weights)")
    parser.add_argument("--weights", choices=("ema", "network"), default="ema",
                        help="with --checkpoint: the EMA weights (default, what the trainer exports) or the last "
                             "optimiser step's raw weights")
    parser.add_argument("--datalist", type=Path, required=True, help="datalist.json of a data set with records")
    parser.add_argument("--max_records", type=int, default=8, help="held-out records with a tumor probed in part 2")
    parser.add_argument("--timesteps", default="600,800,950", help="comma-separated noise steps of part 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for path in (args.model or args.checkpoint, args.datalist):
        if not path.is_file():
            parser.error(f"{path} not found")
    try:
        timesteps = [int(t) for t in args.timesteps.split(",")]
    except ValueError:
        parser.error(f"--timesteps must be comma-separated integers, got {args.timesteps!r}")
    if any(not 0 <= t < 1000 for t in timesteps) or args.max_records < 1:
        parser.error("--timesteps must lie in [0, 999] and --max_records be >= 1")

    import torch

    from custom_components.bundles import bundle_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = args.model
    if args.checkpoint is not None:
        import tempfile

        from custom_components.engines import model_file_from_checkpoint

        model = model_file_from_checkpoint(args.checkpoint, Path(tempfile.mkdtemp(prefix="tcss_text_path_")) / "model.pt",
                                           args.weights)
    root = args.datalist.resolve().parent
    content = json.loads(args.datalist.read_text())
    training = [i for i in content["training"] if i.get("record")]
    held_out = [i for i in content.get("validation", []) if i.get("record")]
    if not training or not held_out:
        parser.error(f"{args.datalist} needs records in both its training and validation splits")
    config = bundle_config("guidegen_tcss", overrides={"device": torch.device("cpu"), "model_path": str(model),
                                                        "class_map_path": str(root / content["class_map"])})
    pipeline, class_map = config.get_parsed_content("pipeline"), config.get_parsed_content("class_map")
    with_tumor = [i for i in held_out if i["record"].get("tumor_organ")][: args.max_records]
    result = {
        "model": str(args.model or args.checkpoint), "weights": "model file" if args.checkpoint is None else args.weights,
        "datalist": str(args.datalist),
        "text_content": text_content(pipeline, training, held_out),
        "prompt_sensitivity": prompt_sensitivity(pipeline, class_map, root, training, with_tumor, timesteps, args.seed),
        "cross_attention_update_ratio": cross_attention_updates(pipeline, root, with_tumor[0], class_map.num_classes, max(timesteps)),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
