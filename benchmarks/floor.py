"""Per-version distance from the floor: training CPU seconds per 60k-image epoch (one thread, synthetic
batches, steady state) against 3 x forward FLOPs / the bf16 (or fp32) matmul rate per CPU second.

    PYTHONPATH=src python benchmarks/floor.py
"""
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, __import__('os').path.dirname(__file__))
from flops import forward_flops, matmul_rate
from fashionlab import models
torch.set_num_threads(1)
_, bf16 = matmul_rate(torch.bfloat16); _, fp32 = matmul_rate(torch.float32)
print(f"1 thread: bf16 matmul {bf16/1e9:.0f} GFLOP per CPU s, fp32 {fp32/1e9:.0f}")
cands = [
 ("cnn fp32 b128", "cnn", {}, False, 128),
 ("cnn bf16 b256", "cnn", {}, True, 256),
 ("fast (D) b256", "fast", {}, True, 256),
 ("C 2conv b256", "fast", dict(convs_per_block=2), True, 256),
 ("E 64-128-256 b256", "fast", dict(widths=(64,128,256)), True, 256),
 ("best b128", "best", {}, True, 128),
]
for k,name,kw,bf,bs in cands:
    torch.manual_seed(0)
    m=models.build_model(name, **kw)
    f=forward_flops(m)
    if bf: m=m.to(memory_format=torch.channels_last)
    opt=torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x=torch.rand(bs,1,28,28); y=torch.randint(0,10,(bs,))
    if bf: x=x.contiguous(memory_format=torch.channels_last)
    def step():
        with torch.autocast("cpu",dtype=torch.bfloat16, enabled=bf):
            out=m(x)
        loss=F.cross_entropy(out.float(),y); opt.zero_grad(); loss.backward(); opt.step()
    for _ in range(2): step()
    n=max(3, int(6000/bs/ (f/15e6)))
    t=time.process_time()
    for _ in range(n): step()
    el=time.process_time()-t
    ips=n*bs/el
    floor = 3*f*60000/(bf16 if bf else fp32)
    print(f"{k:20s} {f/1e6:6.1f} MF  {60000/ips:6.1f} CPU-s/epoch  floor {floor:5.1f} s ({'bf16' if bf else 'fp32'} rate)  {60000/ips/floor:4.1f}x floor  {3*f*ips/1e9:4.0f} GFLOP/CPU-s", flush=True)
