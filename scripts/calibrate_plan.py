#!/usr/bin/env python3
"""Planner calibration: trains ten small jobs on one rank with `qlora train` and prints planned /
measured forward and backward activation peaks and total peak (memory.json against `qlora plan
--json`). docs/SIZING.md quotes its output. Python 3 standard library only.
  python3 scripts/calibrate_plan.py [NAME ...]   (QLORA_BINARY, default build/qlora; QLORA_CALIBRATION_DIR)
"""
import json, subprocess, os, sys
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
Q = os.environ.get("QLORA_BINARY", os.path.join(ROOT, "build", "qlora"))
D = os.environ.get("QLORA_CALIBRATION_DIR", "/tmp/qlora-calibration")
os.makedirs(D, exist_ok=True)
configs = [  # (name, hidden, intermediate, layers, heads, kv heads, vocab, tied, seq, micro-batch, checkpointing, dropout)
 ("gqa",256,704,6,8,4,4096,False,128,2,"reentrant",0),
 ("gqa512",256,704,6,8,4,4096,False,512,2,"reentrant",0),
 ("gqa-off",256,704,6,8,4,4096,False,256,2,"off",0),
 ("mha",256,1408,4,4,4,2048,True,256,1,"reentrant",0),
 ("mha-off",256,1408,4,4,4,2048,True,256,1,"off",0),
 ("gqa1024",256,704,4,8,2,4096,False,1024,1,"reentrant",0),
 ("gqa64mb4",256,704,4,8,2,4096,False,64,4,"reentrant",0),
 ("drop",256,704,4,8,4,4096,False,256,2,"reentrant",0.1),
 ("drop-off",256,704,4,8,4,4096,False,256,2,"off",0.1),
 ("big-off",512,1408,4,8,8,4096,True,512,2,"off",0),
]
sel = sys.argv[1:]
for (n,h,i,l,a,kv,v,tied,seq,mb,ck,dr) in configs:
    if sel and n not in sel: continue
    cfg=dict(model_type="llama",hidden_size=h,intermediate_size=i,num_hidden_layers=l,num_attention_heads=a,num_key_value_heads=kv,vocab_size=v,max_position_embeddings=2048,rms_norm_eps=1e-5,rope_theta=10000.0,tie_word_embeddings=tied,torch_dtype="bfloat16")
    cp=f"{D}/{n}.json"; json.dump(cfg,open(cp,"w"))
    st=f"{D}/{n}.h5"
    if not os.path.exists(st): subprocess.run([Q,"convert","--synthetic",cp,"--out",st],check=True,capture_output=True)
    out=f"{D}/run-{n}"; subprocess.run(["rm","-rf",out])
    subprocess.run([Q,"train","--model",st,"--steps","2","--seq-len",str(seq),"--global-batch",str(mb),"--lora-r","8","--eval-fraction","0","--progress","lines","--checkpointing",ck,"--lora-dropout",str(dr),"--out",out,"--overwrite"],check=True,capture_output=True)
    m=json.load(open(out+"/memory.json"))["ranks"][0]
    p=json.loads(subprocess.run([Q,"plan","--model",st,"--world","1","--micro-batch",str(mb),"--seq-len",str(seq),"--lora-r","8","--checkpointing",ck,"--lora-dropout",str(dr),"--json"],check=True,capture_output=True,text=True).stdout)
    r=p["per_rank"][0]
    f,b,pk=m["forward_activation_peak_bytes"],m["backward_activation_peak_bytes"],m["peak_total_bytes"]
    print(f"{n:10s} fwd plan/meas {r['forward_activations']/f:.3f} ({f/1e6:.2f} MB)  bwd {r['backward_activations']/b:.3f} ({b/1e6:.2f} MB, plan {r['backward_activations']/1e6:.2f})  peak {r['peak']/pk:.3f}")
