"""Regenerate torchvision_reference.json from a real torchvision (run where it imports).

    python tests/models/make_torchvision_reference.py > tests/models/torchvision_reference.json

Records, per model, torchvision's parameter count and state_dict keys with shapes, and for a
few models the first logits of a seeded model on a seeded input (eval mode), which our
definitions must reproduce: same initialisation order, same arithmetic.
"""

import json

import torch
import torchvision

NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg11_bn",
         "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
LOGITS = ["resnet18", "resnet50", "vgg11_bn"]


def seeded_logits(build) -> list[float]:
    torch.manual_seed(0)
    model = build().eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return model(x)[:, :8].flatten().tolist()


if __name__ == "__main__":
    lines = [f'{{"torchvision": "{torchvision.__version__}",', ' "models": {']
    for i, name in enumerate(NAMES):
        build = getattr(torchvision.models, name)
        model = build()
        entry = {"parameters": sum(p.numel() for p in model.parameters()),
                 "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()}}
        if name in LOGITS:
            entry["logits"] = seeded_logits(build)
        comma = "," if i < len(NAMES) - 1 else ""
        lines.append(f'  "{name}": {json.dumps(entry)}{comma}')
    lines.append(" }\n}")
    print("\n".join(lines))
