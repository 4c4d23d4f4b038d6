#!/bin/bash
# After outpost-firstboot.service: is the gateway up and delivering? Then power off.
out=/root/firstboot-probe.json
ok=1
for i in $(seq 1 90); do
    if outpost status --json > /tmp/st.json 2>/dev/null && python3 -c '
import json, sys; s = json.load(open("/tmp/st.json")); sys.exit(0 if s["buffer"]["cursors"]["mqtt"]["acked_seq"] >= 5 else 1)'; then
        ok=0; break
    fi
    sleep 2
done
python3 -c 'import json,sys; print(json.dumps({"delivered": sys.argv[1] == "0", "active": sys.argv[2], "status": sys.argv[3][-1500:], "firstboot": sys.argv[4]}))' \
    "$ok" "$(systemctl is-active outpost)" "$(outpost status 2>&1)" "$(systemctl is-active outpost-firstboot)" > $out
journalctl -u outpost-firstboot -u outpost --no-pager > /root/firstboot-journal.txt 2>&1
systemctl poweroff
