import time, torch
torch.set_num_threads(2)
V,H=32768,256
ws=torch.randn(V,H); 
def tm(f,r=5):
    f(); ts=[]
    for _ in range(r):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    return sorted(ts)[r//2]*1e3
for c in [32,64,128,256,1024]:
    hs=torch.randn(c,H); out=torch.empty(c,V); g=torch.randn(c,V); gw=torch.zeros(V,H); gh=torch.empty(c,H)
    wsT=ws.t().contiguous()
    fl=2*c*H*V/1e9
    r=[tm(lambda: hs@ws.t()), tm(lambda: torch.matmul(hs,ws.t(),out=out)), tm(lambda: hs@wsT), tm(lambda: torch.matmul(g,ws,out=gh)), tm(lambda: gw.addmm_(g.t(),hs)), tm(lambda: torch.mm(hs.t(),g).t())]
    print(c, " ".join(f"{fl/x*1e3:6.1f}" for x in r), "GFLOP/s  (logits, logits out=, logits wT, gh, gw addmm, gw^T)")
