"""Spread of sampled latents: MONAI's DDIM layout vs the inference config's (leading timesteps, bounded x_0).

Samples one latent per step count for the first validation case of a datalist with (a) MONAI's ``DDIMScheduler``
(``clip_sample=False``, timesteps from ``linspace(T-1, 0, n)``) and (b) the scheduler of
``bundles/guidegen_ldm/configs/inference.yaml``, and prints the standard deviation of each (training latents are
scaled to 1).

Usage (prints JSON):
    .venv/bin/python bench/ldm_sampling_spread.py --model_path /tmp/ldm_demo/models/model.pt \
        --autoencoder_path /tmp/ae_ablation/hdr_mask/models/model.pt --steps 50 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--autoencoder_path", required=True)
    parser.add_argument("--datalist", default=str(REPO / "demo" / "datalist.json"))
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    args = parser.parse_args()

    from monai.bundle import ConfigParser
    from monai.networks.schedulers import DDIMScheduler

    from custom_components.data.datalist import load_datalist
    from custom_components.networks import load_model_weights
    from custom_components.pipelines import LatentDiffusionSampler

    config = ConfigParser()
    config.read_config(str(REPO / "bundles/guidegen_ldm/configs/inference.yaml"))
    config.update({"model_path": args.model_path, "autoencoder_path": args.autoencoder_path})
    network = config.get_parsed_content("network")
    load_model_weights(args.model_path, network, config.get_parsed_content("checkpoint_info"))
    info = config.get_parsed_content("model_info")
    case = load_datalist(args.datalist, splits=["validation"])["validation"][0]
    mask = torch.as_tensor(np.asarray(nib.load(case["label"]).dataobj).astype(np.int64))[None, None]
    schedulers = {
        "monai_ddim": DDIMScheduler(info["num_train_timesteps"], schedule="cosine", clip_sample=False),
        "inference_config": config.get_parsed_content("scheduler"),
    }
    results = {}
    for name, scheduler in schedulers.items():
        sampler = LatentDiffusionSampler(network, scheduler, config.get_parsed_content("text_encoder"),
                                         info["latent_shape"][0])
        for steps in args.steps:
            latent = sampler(mask, [case["text"]], num_inference_steps=steps, seed=0, progress=False)
            results[f"{name}_{steps}_steps"] = round(float(latent.std()), 3)
    print(json.dumps({"case": case["case_id"], "latent_std": results}, indent=1))


if __name__ == "__main__":
    main()
