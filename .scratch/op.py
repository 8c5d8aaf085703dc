import time, torch
for nt in (1,2):
    torch.set_num_threads(nt)
    for r in (16,64,256):
        x=torch.randn(r,32768); y=torch.empty_like(x)
        for name,f in (("exp",lambda: torch.exp(x,out=y)),("mul_",lambda: y.mul_(1.0001)),("sum",lambda: x.sum(1)),("amax",lambda: x.amax(1))):
            f(); n=max(1,int(2e7/x.numel())); t0=time.perf_counter()
            for _ in range(n): f()
            dt=(time.perf_counter()-t0)/n
            print(nt,r,name,f"{dt*1e3:.3f} ms  {dt/x.numel()*1e9:.3f} ns/el")
