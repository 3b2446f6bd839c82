# nbdroot: the node-side steps shared by our own initrd, the initramfs-tools
# script and the dracut module. POSIX sh; sourced after cmdline.sh and after
# nbdroot_parse succeeded. The caller defines log MESSAGE and fail REASON
# (fail does not return), and may set NBDROOT_LIB (where udhcpc.script is)
# and NBDROOT_RUN (a writable directory for logs and state).
NBDROOT_LIB=${NBDROOT_LIB:-/lib/nbdroot}
NBDROOT_RUN=${NBDROOT_RUN:-/run/nbdroot}

# nbdroot_ifaces: the interfaces to try, the named one or every one but lo.
nbdroot_ifaces() {
	if [ -n "$NBDROOT_IP_DEV" ]; then echo "$NBDROOT_IP_DEV"; return; fi
	for d in /sys/class/net/*; do
		n=${d##*/}
		[ "$n" = lo ] || [ -e "$d/wireless" ] || echo "$n"
	done
}

# nbdroot_net: brings up the network as ip= says (DHCP with short timeouts
# by default) and sets DEV to the interface that worked.
nbdroot_net() {
	i=0
	while [ -z "$(nbdroot_ifaces)" ] || { [ -n "$NBDROOT_IP_DEV" ] && ! [ -e "/sys/class/net/$NBDROOT_IP_DEV" ]; }; do
		i=$((i + 1))
		[ $i -gt 50 ] && fail "no network interface${NBDROOT_IP_DEV:+ $NBDROOT_IP_DEV} after 10 s (driver missing from the initrd?)"
		sleep 0.2
	done
	ip link set lo up

	DEV=
	case $NBDROOT_IP_METHOD in
	off)
		DEV=$(nbdroot_ifaces | head -n 1)
		log "ip=$NBDROOT_IP: not configuring the network; using $DEV as it is" ;;
	static)
		DEV=$(nbdroot_ifaces | head -n 1)
		prefix=24
		[ -n "$NBDROOT_IP_MASK" ] && prefix=$(ipcalc -p "$NBDROOT_IP_ADDR" "$NBDROOT_IP_MASK" | sed 's/PREFIX=//')
		log "static address $NBDROOT_IP_ADDR/$prefix on $DEV${NBDROOT_IP_GW:+, gateway $NBDROOT_IP_GW}"
		ip link set "$DEV" up || fail "cannot bring up $DEV"
		ip addr add "$NBDROOT_IP_ADDR/$prefix" dev "$DEV" || fail "cannot set $NBDROOT_IP_ADDR/$prefix on $DEV"
		[ -n "$NBDROOT_IP_GW" ] && { ip route add default via "$NBDROOT_IP_GW" dev "$DEV" || fail "cannot add the route via $NBDROOT_IP_GW"; }
		: >/etc/resolv.conf
		for d in $NBDROOT_IP_DNS; do echo "nameserver $d" >>/etc/resolv.conf; done ;;
	dhcp)
		# Three rounds over the interfaces, each DHCP try about 4 s.
		for round in 1 2 3; do
			for n in $(nbdroot_ifaces); do
				log "DHCP on $n (round $round/3)"
				ip link set "$n" up
				if udhcpc -i "$n" -f -q -n -t 4 -T 1 -A 1 -s "$NBDROOT_LIB/udhcpc.script" >"$NBDROOT_RUN/udhcpc.log" 2>&1; then
					DEV=$n
					break 2
				fi
			done
		done
		[ -n "$DEV" ] || fail "no DHCP answer on $(nbdroot_ifaces | tr '\n' ' ')after 3 rounds"
		. "$NBDROOT_RUN/net"
		log "$DEV: $IP/$MASK${ROUTER:+, router $ROUTER}" ;;
	esac
}

# nbdroot_node_id: NBDROOT_NODE (default: DEV's MAC) and NBDROOT_EXPORT.
nbdroot_node_id() {
	if [ -z "$NBDROOT_NODE" ]; then
		mac=$(cat "/sys/class/net/$DEV/address" 2>/dev/null)
		NBDROOT_NODE=$(nbdroot_mac_to_id "$mac") || fail "no node id: $DEV has no MAC address ('$mac'); give nbdroot.node="
	fi
	nbdroot_export
}

# nbdroot_attach_name: the export name nbd-client asks for: <image>/<node>,
# with ?mode=<mode> when the command line gave nbdroot.mode= (the server
# creates the node in that mode, and refuses a node registered otherwise).
nbdroot_attach_name() {
	if [ "${NBDROOT_MODE_GIVEN:-0}" = 1 ]; then
		echo "$NBDROOT_EXPORT?mode=$NBDROOT_MODE"
	else
		echo "$NBDROOT_EXPORT"
	fi
}

# nbdroot_attach_one HOST PORT: nbd-client, given 20 s to connect and hand
# the socket to the kernel (it then exits, or stays as a daemon in ioctl
# mode).
nbdroot_attach_one() {
	# shellcheck disable=SC2086
	nbd-client "$1" "$2" /dev/nbd0 -N "$(nbdroot_attach_name)" $CLIENT_OPTS \
		>"$NBDROOT_RUN/nbd-client.log" 2>&1 &
	pid=$!
	n=0
	while kill -0 $pid 2>/dev/null; do
		n=$((n + 1))
		if [ $n -gt 100 ]; then
			kill $pid 2>/dev/null
			echo "no answer within 20 s" >>"$NBDROOT_RUN/nbd-client.log"
			break
		fi
		sleep 0.2
	done
	wait $pid
}

# nbdroot_attach: tries every server, NBDROOT_RETRIES rounds with a
# backoff of 1, 2, 4, 8, 8... s; sets SERVER and waits for /dev/nbd0's size.
nbdroot_attach() {
	# nbd-client flags. Netlink (default): nbd-client hands the socket to
	# the kernel and exits, so nothing is left to kill at switch_root or at
	# systemd's shutdown. ioctl (nbdroot.netlink=0): nbd-client stays in
	# NBD_DO_IT with -persist, marked '@' for systemd (-systemd-mark), but
	# any signal to it, even systemd-shutdown's SIGSTOP/SIGCONT broadcast,
	# makes the kernel drop the socket. See README.md.
	CLIENT_OPTS="-persist -systemd-mark"
	[ "$NBDROOT_NETLINK" = 1 ] || CLIENT_OPTS="$CLIENT_OPTS -nonetlink"
	# With netlink, nbdroot-keeper sets the request timeout (nbdroot_keep).
	[ "$NBDROOT_NETLINK" = 0 ] && [ "$NBDROOT_TIMEOUT" -gt 0 ] &&
		CLIENT_OPTS="$CLIENT_OPTS -timeout $NBDROOT_TIMEOUT"
	[ -n "$NBDROOT_BLOCKSIZE" ] && CLIENT_OPTS="$CLIENT_OPTS -block-size $NBDROOT_BLOCKSIZE"

	if nbdroot_agent_wanted; then
		nbdroot_attach_agent
		return
	fi
	log "node $NBDROOT_NODE, export $NBDROOT_EXPORT ($NBDROOT_MODE), servers: $NBDROOT_SERVERS"
	SERVER=
	round=1
	delay=1
	while [ $round -le "$NBDROOT_RETRIES" ]; do
		for s in $NBDROOT_SERVERS; do
			host=${s%:*}
			port=${s##*:}
			host=${host#\[}
			host=${host%\]}
			log "connecting to $s, export $NBDROOT_EXPORT (round $round/$NBDROOT_RETRIES)"
			if nbdroot_attach_one "$host" "$port"; then
				SERVER=$s
				break 2
			fi
			log "$s: $(grep -v '^Negotiation' "$NBDROOT_RUN/nbd-client.log" | tr '\n' ' ')"
		done
		[ $round -lt "$NBDROOT_RETRIES" ] && { log "no server answered; next round in $delay s"; sleep $delay; }
		round=$((round + 1))
		delay=$((delay * 2))
		[ $delay -gt 8 ] && delay=8
	done
	[ -n "$SERVER" ] || fail "no server gave us export $NBDROOT_EXPORT after $NBDROOT_RETRIES rounds over: $NBDROOT_SERVERS"
	nbdroot_wait_size
	log "attached /dev/nbd0 to $SERVER/$NBDROOT_EXPORT ($(($(cat /sys/block/nbd0/size) / 2048)) MiB)"
	nbdroot_keep
}

# nbdroot_wait_size: waits for /dev/nbd0 to have a size.
nbdroot_wait_size() {
	i=0
	while [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" = 0 ]; do
		i=$((i + 1))
		[ $i -gt 50 ] && fail "/dev/nbd0 still has no size 10 s after nbd-client connected"
		sleep 0.2
	done
}

# nbdroot_agent_wanted: nbdroot-agent is in this initrd and the command
# line did not turn it off (nbdroot.agent=off). With nbdroot.tls=require
# there is no other way: without a working agent the boot fails, it never
# attaches in plaintext.
nbdroot_agent_wanted() {
	[ "$NBDROOT_AGENT" = on ] || return 1
	if ! command -v nbdroot-agent >/dev/null 2>&1; then
		[ "$NBDROOT_TLS" = require ] &&
			fail "nbdroot.tls=require, and this initrd has no nbdroot-agent (the kernel cannot do TLS): not attaching in plaintext"
		return 1
	fi
	# A library missing from the initrd (libroaring from a tree that lacks
	# it, an older glibc): boot as without the agent rather than fail.
	if ! _a_out=$(nbdroot-agent --help 2>&1 >/dev/null); then
		_a_out=$(echo "$_a_out" | head -n 2 | tr '\n' ' ')
		[ "$NBDROOT_TLS" = require ] &&
			fail "nbdroot.tls=require, and nbdroot-agent cannot run here ($_a_out): not attaching in plaintext"
		log "WARNING: nbdroot-agent cannot run here ($_a_out): attaching directly"
		return 1
	fi
	return 0
}

# nbdroot_key_file: with nbdroot.tls=require, writes the node's key where
# only root can read it (created under umask 077: never readable by others,
# not even for a moment) and sets _a_tls to the agent's TLS options. printf
# is the shell's own, so the key is in no process's arguments. The node id
# may come from the MAC only now: the key must be that node's.
nbdroot_key_file() {
	_a_tls=
	[ "$NBDROOT_TLS" = require ] || return 0
	[ "$NBDROOT_KEY_ID" = "$NBDROOT_NODE" ] ||
		fail "nbdroot.key is for node '$NBDROOT_KEY_ID', and this node is '$NBDROOT_NODE'"
	_a_key="$NBDROOT_RUN/node.psk"
	rm -f "$_a_key"
	(umask 077 && printf '%s\n' "$NBDROOT_KEY" >"$_a_key") ||
		fail "cannot write the node's key to $_a_key"
	_a_tls="--tls require --tls-key-file $_a_key"
}

# nbdroot_agent_start: starts nbdroot-agent, which outlives the initrd: it
# serves /dev/nbd0 on NBDROOT_RUN/agent.sock, keeps the node's view on the
# servers (reconnecting by itself; no nbdroot-keeper then) and, with
# nbdroot.tracker=, reads clean chunks from peers and serves them. Marked
# '@' (a root storage daemon systemd leaves alone at shutdown). Waits for
# its ready file.
nbdroot_agent_start() {
	_a_peers=$NBDROOT_PEERS
	# nbdroot.mode=: the mode of a node this attach creates (the agent asks
	# with ?mode=, and again on every reconnect).
	_a_mode=
	[ "${NBDROOT_MODE_GIVEN:-0}" = 1 ] && _a_mode="--mode $NBDROOT_MODE"
	_a_tracker=
	if [ -z "$NBDROOT_TRACKER" ]; then
		_a_peers=off
	else
		_a_tracker="--tracker $NBDROOT_TRACKER"
	fi
	nbdroot_key_file
	# Under TLS peers are TLS too (the agent opens the generation's peer key
	# with the node's key), or off when the server's answer has none.
	_a_how="peers $_a_peers${_a_tracker:+ (tracker $NBDROOT_TRACKER)}"
	[ -n "$_a_tls" ] && _a_how="TLS with node $NBDROOT_NODE's key, $_a_how"
	rm -f "$NBDROOT_RUN/agent.ready" "$NBDROOT_RUN/agent.sock"
	log "nbdroot-agent: export $NBDROOT_EXPORT, servers: $NBDROOT_SERVERS, $_a_how, cache $NBDROOT_CACHE"
	# In NBDROOT_RUN, with the stats file named relative to it: after
	# switch_root the agent's / is the emptied initramfs, but its working
	# directory is still the run directory, now the new root's.
	# shellcheck disable=SC2086
	(cd "$NBDROOT_RUN" && exec nbdroot-agent --systemd-mark \
		--server "$(echo $NBDROOT_SERVERS | tr ' ' ',')" \
		--export "$NBDROOT_EXPORT" --socket "$NBDROOT_RUN/agent.sock" \
		--stats-file agent.stats --ready-file "$NBDROOT_RUN/agent.ready" \
		--peers "$_a_peers" $_a_tracker $_a_mode $_a_tls --cache "$NBDROOT_CACHE" \
		--peer-listen "0.0.0.0:$NBDROOT_PEER_PORT") \
		</dev/null >"$NBDROOT_RUN/agent.log" 2>&1 &
	_a_pid=$!
	# The agent keeps trying the servers until it attaches (a server that
	# is down or not up yet, a network still coming up, a TLS handshake
	# the server fails because it has no key for this node yet): under
	# TLS the key came once, and failing the boot would lose it. It stops
	# by itself only on a refusal that retrying cannot change (no such
	# export, not this node's), and that fails the boot. Meanwhile the
	# console says every 10 s what it is waiting on.
	i=0
	while ! [ -s "$NBDROOT_RUN/agent.ready" ]; do
		kill -0 $_a_pid 2>/dev/null ||
			fail "nbdroot-agent stopped: $(tail -n 5 "$NBDROOT_RUN/agent.log" | tr '\n' ' ')"
		i=$((i + 1))
		[ $((i % 50)) = 0 ] &&
			log "still waiting for nbdroot-agent to attach $NBDROOT_EXPORT ($((i / 5)) s): $(tail -n 1 "$NBDROOT_RUN/agent.log")"
		sleep 0.2
	done
	# The agent holds the key in memory (locked) from here on.
	[ -n "$_a_tls" ] && rm -f "$_a_key"
	echo "$_a_pid" >"$NBDROOT_RUN/agent.pid"
}

# nbdroot_attach_agent: /dev/nbd0 on the agent's Unix socket.
nbdroot_attach_agent() {
	nbdroot_agent_start
	SERVER="unix:$NBDROOT_RUN/agent.sock"
	# A request waits in the agent while it reconnects: only -timeout when
	# the command line asked for one.
	[ "$NBDROOT_NETLINK" = 1 ] && [ "$NBDROOT_TIMEOUT" -gt 0 ] &&
		CLIENT_OPTS="$CLIENT_OPTS -timeout $NBDROOT_TIMEOUT"
	# shellcheck disable=SC2086
	nbd-client -unix "$NBDROOT_RUN/agent.sock" /dev/nbd0 -N "$NBDROOT_EXPORT" $CLIENT_OPTS \
		>"$NBDROOT_RUN/nbd-client.log" 2>&1 ||
		fail "nbd-client on the agent's socket: $(grep -v '^Negotiation' "$NBDROOT_RUN/nbd-client.log" | tr '\n' ' ')"
	nbdroot_wait_size
	log "attached /dev/nbd0 to nbdroot-agent ($NBDROOT_EXPORT, $(($(cat /sys/block/nbd0/size) / 2048)) MiB)"
}

# nbdroot_keep: starts nbdroot-keeper, which outlives the initrd and
# reconnects /dev/nbd0 when the server restarts or the network drops (the
# kernel holds I/O meanwhile). Servers as numeric addresses, the one that
# answered first; a host name cannot be resolved after switch_root.
nbdroot_keep() {
	[ "$NBDROOT_NETLINK" = 1 ] || return 0
	if ! command -v nbdroot-keeper >/dev/null 2>&1; then
		log "WARNING: no nbdroot-keeper in this initrd: a server restart will fail this node's I/O"
		return 0
	fi
	_k_servers=$SERVER
	for s in $NBDROOT_SERVERS; do [ "$s" = "$SERVER" ] || _k_servers="$_k_servers $s"; done
	_k_timeout=$NBDROOT_TIMEOUT
	[ "$_k_timeout" -gt 0 ] || _k_timeout=15
	# shellcheck disable=SC2086
	nbdroot-keeper --device /dev/nbd0 --export "$(nbdroot_attach_name)" \
		--timeout "$_k_timeout" $_k_servers >"$NBDROOT_RUN/keeper.log" 2>&1 ||
		log "WARNING: nbdroot-keeper did not start ($(tr '\n' ' ' <"$NBDROOT_RUN/keeper.log")): a server restart will fail this node's I/O"
}

# nbdroot_mount MNT INIT: mounts /dev/nbd0 on MNT and checks that INIT is
# there; writes NBDROOT_RUN/state.
nbdroot_mount() {
	opts=rw
	[ "$NBDROOT_RO" = 1 ] && opts=ro
	[ -n "$NBDROOT_FSOPTS" ] && opts="$opts,$NBDROOT_FSOPTS"
	mount -t "$NBDROOT_FSTYPE" -o "$opts" /dev/nbd0 "$1" ||
		fail "cannot mount /dev/nbd0 ($NBDROOT_FSTYPE, $opts) from $SERVER/$NBDROOT_EXPORT"
	[ -e "$1$2" ] || [ -L "$1$2" ] ||
		{ umount "$1"; fail "the root from $NBDROOT_EXPORT has no $2"; }
	nbdroot_write_state
}

# nbdroot_write_state: NBDROOT_RUN/state, what the node attached (read by
# the root's own tools and tests).
nbdroot_write_state() {
	{
		echo "NBDROOT_SERVER=$SERVER"
		echo "NBDROOT_EXPORT=$NBDROOT_EXPORT"
		echo "NBDROOT_NODE=$NBDROOT_NODE"
		echo "NBDROOT_MODE=$NBDROOT_MODE"
		echo "NBDROOT_DEV=$DEV"
	} >"$NBDROOT_RUN/state"
}
