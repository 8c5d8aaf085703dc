import sys, time, torch
sys.path.insert(0,'benchmarks')
import bench_loss as b
torch.set_num_threads(2)
inp=b.make_inputs(1024,256,32768,torch.float32,'cpu')
def tm(f,r=3):
    f(*inp); ts=[]
    for _ in range(r):
        for x in inp[:2]: x.grad=None
        t0=time.perf_counter(); f(*inp); ts.append(time.perf_counter()-t0)
    return sorted(ts)[r//2]*1e3
fl=tm(b.run_floor); fu=tm(b.run_fused); fl2=tm(b.run_floor)
print(f"floor {fl:.0f} {fl2:.0f} fused {fu:.0f} ratio {fu/min(fl,fl2):.2f}")
if len(sys.argv)>1:
    from torch.profiler import profile
    with profile() as p: b.run_fused(*inp)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
