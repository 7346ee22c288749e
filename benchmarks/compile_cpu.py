"""Does torch.compile pay for the fast model on this CPU? Steady-state CPU s per step and first-step cost.

    PYTHONPATH=src python benchmarks/compile_cpu.py
"""
import time, torch, torch.nn.functional as F
torch.set_num_threads(1)
from fashionlab import models
bs = 256
x = torch.rand(bs, 1, 28, 28).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 10, (bs,))
for comp in (False, True):
    torch.manual_seed(0)
    m = models.build_model("fast").to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    f = torch.compile(m) if comp else m
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = f(x)
        loss = F.cross_entropy(out.float(), y); opt.zero_grad(); loss.backward(); opt.step()
        return loss
    c0 = time.process_time(); step(); first = time.process_time() - c0
    step()
    c0 = time.process_time(); n = 20
    for _ in range(n): step()
    per = (time.process_time() - c0) / n
    print(f"compile={comp}: first step {first:.1f} CPU s, then {per*1000:.0f} CPU ms/step "
          f"({60000/bs*per:.1f} CPU s per 60k epoch)", flush=True)
