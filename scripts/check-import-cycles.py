#!/usr/bin/env python3
"""Fails when a crate's modules import each other in a circle.

Usage: scripts/check-import-cycles.py DIR...  (each a crate's src/)

A module is a file (`a/mod.rs` is `a`); an edge is a `crate::` or `super::`
path in its code (comments and `mod tests { ... }` blocks skipped) to
another module that is neither its parent nor its child. Any strongly
connected set of two or more modules is a circle.
"""
import re, os, sys


def check(root):
    mods={}
    for dp,_,fs in os.walk(root):
        for f in fs:
            if f.endswith('.rs'):
                p=os.path.join(dp,f); rel=os.path.relpath(p,root)[:-3]
                parts=rel.split('/')
                if parts[-1]=='mod': parts=parts[:-1]
                if parts==['lib']: parts=[]
                mods['::'.join(parts)]=p
    def resolve(path):
        # longest module prefix
        parts=path.split('::')
        for n in range(len(parts),0,-1):
            m='::'.join(parts[:n])
            if m in mods: return m
        return None
    edges={m:set() for m in mods}
    for m,p in mods.items():
        s=open(p).read()
        s=re.sub(r'//[^\n]*','',s)
        # skip test modules
        s=s.split('#[cfg(test)]\nmod tests {')[0]
        for path in re.findall(r'crate::([a-z_]+(?:::[a-z_]+)*)',s):
            t=resolve(path)
            if t and t!=m and not m.startswith(t+'::') and not t.startswith(m+'::') and t!='':
                edges[m].add(t)
        for path in re.findall(r'\bsuper::([a-z_]+(?:::[a-z_]+)*)',s):
            base=m.rsplit('::',1)[0] if '::' in m else ''
            full=(base+'::'+path) if base else path
            t=resolve(full)
            if t and t!=m and not m.startswith(t+'::') and not t.startswith(m+'::'):
                edges[m].add(t)
    # tarjan
    idx={};low={};st=[];on=set();res=[];i=[0]
    def sc(v):
        idx[v]=low[v]=i[0];i[0]+=1;st.append(v);on.add(v)
        for w in edges[v]:
            if w not in idx: sc(w);low[v]=min(low[v],low[w])
            elif w in on: low[v]=min(low[v],idx[w])
        if low[v]==idx[v]:
            comp=[]
            while True:
                w=st.pop();on.discard(w);comp.append(w)
                if w==v:break
            if len(comp)>1: res.append(comp)
    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in idx: sc(v)
    return res


failed = False
for root in sys.argv[1:]:
    for circle in check(root):
        failed = True
        print(f"{root}: import circle: {' -> '.join(sorted(circle))}")
sys.exit(1 if failed else 0)
