import torch, time, sys
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
NC=int(sys.argv[2]) if len(sys.argv)>2 else 40
def t(fn, n=7):
    fn()
    ts=[]
    for _ in range(n):
        a=time.perf_counter(); fn(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]/NC*1e3
for (inf,outf) in [(576,576),(576,1536),(1536,576),(576,192)]:
    Ws=[torch.randn(outf,inf)*0.02 for _ in range(NC)]
    qs=[];ss=[];qTs=[];p4s=[];szs=[]
    g=32
    for W in Ws:
        s=W.abs().amax(1)/127; q=torch.round(W/s[:,None]).clamp(-127,127).to(torch.int8)
        qs.append(q);ss.append(s);qTs.append(q.t().contiguous())
        Wg=W.view(outf,inf//g,g); mn=Wg.amin(-1,keepdim=True); mx=Wg.amax(-1,keepdim=True)
        sc=((mx-mn)/15).clamp(min=1e-8); q4=torch.round((Wg-mn)/sc).clamp(0,15).to(torch.int32).view(outf,inf)
        szs.append(torch.stack([sc.squeeze(-1).t(),(mn+8*sc).squeeze(-1).t()],-1).contiguous())
        p4s.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4,1))
    ones=torch.ones(inf)
    for M in [1,2,8,40]:
        x=torch.randn(M,inf); dy=torch.randn(M,outf)
        f32=t(lambda: [torch.nn.functional.linear(x,W) for W in Ws])
        f32b=t(lambda: [dy@W for W in Ws])
        i8=t(lambda: [torch.ops.aten._weight_int8pack_mm(x,q,s) for q,s in zip(qs,ss)])
        i8b=t(lambda: [torch.ops.aten._weight_int8pack_mm(dy*s,qT,ones) for qT,s in zip(qTs,ss)])
        i4=t(lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x,p,g,sz) for p,sz in zip(p4s,szs)])
        print(f"{inf}x{outf} M={M}: fp32 {f32:.3f} int8 {i8:.3f} int4g32 {i4:.3f} | bwd fp32 {f32b:.3f} int8T {i8b:.3f}  GB/s fp32 {inf*outf*4/f32/1e6:.1f}",flush=True)
