#!/bin/bash
# Runs inside the booted root (outpost-deploy-probe.service): exercises outpost.service for real
# and writes one JSON line per check to /root/probe.jsonl, then powers the container off.
out=/root/probe.jsonl
: > $out
check() { python3 -c 'import json,sys; print(json.dumps({"name": sys.argv[1], "ok": sys.argv[2] == "0", "detail": sys.argv[3][-1500:]}))' "$1" "$2" "$3" >> $out; }
prop() { systemctl show outpost -P "$1"; }
wait_for() { for i in $(seq 1 "$1"); do if eval "$2"; then return 0; fi; sleep 1; done; return 1; }

cp /srv/gateway.toml /etc/outpost/outpost.toml
mkdir -p /etc/systemd/system/outpost.service.d
# A shorter watchdog so the stall test takes seconds; everything else is the shipped unit.
printf '[Service]\nWatchdogSec=10s\n' > /etc/systemd/system/outpost.service.d/test.conf
systemctl daemon-reload
wait_for 60 'systemctl is-active -q mosquitto'

systemctl start outpost; rc=$?
check "systemctl start returns after READY=1 (Type=notify)" $rc "$(systemctl status outpost --no-pager 2>&1 | head -20)"
pid=$(prop MainPID)
wait_for 60 'outpost status --json 2>/dev/null | python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if s[\"buffer\"][\"cursors\"][\"mqtt\"][\"acked_seq\"] >= 5 else 1)"'
check "outpost status shows samples delivered by the service" $? "$(outpost status 2>&1)"
wait_for 30 '[ "$(prop StatusText)" != "" ]'
check "the status line is set" $? "StatusText=$(prop StatusText)"
journalctl -u outpost -o short-monotonic --no-pager -n 3 > /dev/null

systemctl reload outpost; rc=$?
sleep 2
check "a valid reload succeeds and keeps the process" $([ $rc = 0 ] && [ "$(prop MainPID)" = "$pid" ] && echo 0 || echo 1) "rc=$rc pid $pid -> $(prop MainPID)"

cp /srv/broken.toml /etc/outpost/outpost.toml
systemctl reload outpost; rc=$?
check "a rejected reload makes systemctl reload fail; the gateway keeps running" $([ $rc != 0 ] && systemctl is-active -q outpost && [ "$(prop MainPID)" = "$pid" ] && echo 0 || echo 1) "rc=$rc active=$(systemctl is-active outpost) $(journalctl -u outpost --no-pager -n 5 2>&1)"
cp /srv/gateway.toml /etc/outpost/outpost.toml

restarts=$(prop NRestarts)
kill -STOP "$pid"
wait_for 90 '[ "$(prop NRestarts)" -gt "$restarts" ] && systemctl is-active -q outpost'
rc=$?
check "a stalled gateway (SIGSTOP) misses its watchdog pings and is restarted" $rc "NRestarts $restarts -> $(prop NRestarts) pid $pid -> $(prop MainPID) $(journalctl -u outpost --no-pager 2>&1 | grep -i watchdog | tail -2)"

cp /srv/broken.toml /etc/outpost/outpost.toml
systemctl restart outpost; rc=$?
restarts=$(prop NRestarts)
sleep 12
check "an invalid configuration fails the start and is not restarted in a loop" $([ $rc != 0 ] && [ "$(prop NRestarts)" = "$restarts" ] && [ "$(systemctl is-active outpost)" = failed ] && echo 0 || echo 1) "rc=$rc NRestarts $restarts -> $(prop NRestarts) state=$(systemctl is-active outpost) $(journalctl -u outpost --no-pager -n 8 2>&1)"
journalctl -u outpost --no-pager -n 40 > /root/journal-config-error.txt 2>&1
journalctl -u outpost -p err -o cat --no-pager 2>&1 | grep -q "not restarting until it is fixed"
check "the line saying so is logged with priority err (SyslogLevelPrefix)" $? "$(journalctl -u outpost -p err -o cat --no-pager -n 5 2>&1)"
cp /srv/gateway.toml /etc/outpost/outpost.toml
systemctl reset-failed outpost
systemctl start outpost
check "after fixing the file the service starts again" $? "$(systemctl is-active outpost)"

journalctl -u outpost -p warning --no-pager -o cat > /root/journal-warnings.txt 2>&1
systemctl stop outpost; rc=$?
check "systemctl stop ends the gateway cleanly" $([ $rc = 0 ] && [ "$(prop Result)" = success ] && echo 0 || echo 1) "rc=$rc Result=$(prop Result) $(journalctl -u outpost --no-pager -n 5 2>&1)"
journalctl -u outpost --no-pager > /root/journal.txt 2>&1
rm -rf /etc/systemd/system/outpost.service.d
echo done >> /root/probe.done
systemctl poweroff
