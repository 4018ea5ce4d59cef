import torch, time, sys
from relat_core.quantized import kernels; L = kernels()  # relat_core/kernels/lowbit.cpp
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
NC=40
def t(fn, n=9):
    fn(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); fn(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]/NC*1e3
for (inf,outf) in [(576,576),(576,1536),(1536,576),(576,192)]:
    Ws=[torch.randn(outf,inf)*0.02 for _ in range(NC)]
    qs=[];ss=[]; p4=[]
    for W in Ws:
        s=W.abs().amax(1)/127; q=torch.round(W/s[:,None]).clamp(-127,127).to(torch.int8)
        qs.append(q);ss.append(s); p4.append((torch.randint(0,256,(outf,inf//2),dtype=torch.uint8), torch.rand(outf,inf//32), torch.rand(outf,inf//32)))
    for M in [1,2,4,8,40]:
        x=torch.randn(M,inf); dy=torch.randn(M,outf)
        f32=t(lambda: [torch.nn.functional.linear(x,W) for W in Ws])
        f32b=t(lambda: [dy@W for W in Ws])
        c=t(lambda: [L.int8_forward(x,q,s) for q,s in zip(qs,ss)])
        cb=t(lambda: [L.int8_backward(dy,q,s) for q,s in zip(qs,ss)])
        c4=t(lambda: [L.int4_forward(x,*p) for p in p4])
        c4b=t(lambda: [L.int4_backward(dy,*p) for p in p4])
        dq=t(lambda: [torch.nn.functional.linear(x,L.int8_dequantize(q,s)) for q,s in zip(qs,ss)])
        dq4=t(lambda: [torch.nn.functional.linear(x,L.int4_dequantize(*p)) for p in p4])
        print(f"{inf}x{outf} M={M}: fp32 {f32:.3f} int8 {c:.3f} int4 {c4:.3f} deq8+lin {dq:.3f} deq4+lin {dq4:.3f} | bwd fp32 {f32b:.3f} int8 {cb:.3f} int4 {c4b:.3f}",flush=True)
