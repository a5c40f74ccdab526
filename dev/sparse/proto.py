# Prototype of the expiry algorithm (bucketed, sorted order) vs brute force per-row top-w.
import random
def brute_keep(keys, L, w):
    # keys: list of rkey (0 = not candidate); candidates u <= L
    c = [ (keys[u], u) for u in range(L+1) if keys[u] != 0 ]
    c.sort(reverse=True)
    return set(u for _, u in c[:w])

def expiry_bucket(keys, w, G):
    N = len(keys)
    cand = [k != 0 for k in keys]
    srt = sorted([u for u in range(N) if cand[u]], key=lambda u: keys[u], reverse=True)
    M = len(srt)
    nb = (N + G - 1)//G
    Lg = [min(N-1, (g+1)*G-1) for g in range(nb)]
    # coarse: K_g, P_g (sorted position), cntc_g
    Kg=[0]*nb; Pg=[M]*nb; cnt=[0]*nb
    for g in range(nb):
        c = 0
        for p,u in enumerate(srt):
            if u <= Lg[g]:
                c += 1
                if c == w: Kg[g]=keys[u]; Pg[g]=p
        cnt[g]=c
    Kf=[0]*N
    for g in range(nb):
        if Kg[g]==0: continue
        Kprev = Kg[g-1] if g>0 else 0
        pend = Pg[g-1] if (g>0 and Kprev!=0) else M-1
        V=[srt[p] for p in range(Pg[g], pend+1) if srt[p] <= Lg[g]]
        assert len(V) <= G+1, (len(V), G)
        z0 = w if Kprev != 0 else (cnt[g-1] if g>0 else 0)
        z = z0
        for L in range(g*G, Lg[g]+1):
            if cand[L] and keys[L] >= Kprev: z += 1
            a = z - w
            if a < 0: continue
            # (a+1)-th smallest among V with idx<=L
            k=0
            for u in reversed(V):
                if u <= L:
                    k+=1
                    if k==a+1: Kf[L]=keys[u]; break
            assert k==a+1
    e=[0]*N
    for j in range(N):
        if not cand[j]: e[j]=j; continue
        lo,hi=j,N
        while lo<hi:
            mid=(lo+hi)//2
            if Kf[mid] > keys[j]: hi=mid
            else: lo=mid+1
        e[j]=lo
    return e

def ordval(x):
    return x
random.seed(1)
for trial in range(400):
    N = random.choice([1,2,3,5,17,31,64,100,257])
    w = random.choice([1,2,3,7,16,N-1 if N>1 else 1,N,N+3])
    G = random.choice([1,2,4,8,16,32])
    nd = random.choice([1,2,5,1000])
    pm = random.choice([0,0.3,0.9])
    keys=[]
    for u in range(N):
        if random.random() < pm: keys.append(0)
        else: keys.append(((random.randrange(nd)+1) << 20) | u)
    e = expiry_bucket(keys,w,G)
    for L in range(N):
        ks = brute_keep(keys, L, w)
        ke = set(j for j in range(N) if j <= L < e[j])
        assert ks == ke, (trial, N, w, G, L)
    # tile bound: union over L in [lo,hi] <= w + hi-lo
    for M_ in [1,3,8]:
        for lo in range(-2, N):
            hi=min(N-1, lo+M_-1)
            if hi<0: continue
            U=set(j for j in range(N) if j<=hi and e[j]>max(j,lo))
            U2=set()
            for L in range(max(lo,0),hi+1): U2|=brute_keep(keys,L,w)
            assert U==U2
            assert len(U) <= w + (hi-max(lo,0)), (len(U), w, hi, lo)
print("ok")
