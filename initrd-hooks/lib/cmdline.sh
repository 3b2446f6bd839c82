# nbdroot: the kernel command-line parser shared by our own initrd, the
# initramfs-tools script and the dracut module. POSIX sh (busybox ash, dash,
# klibc sh); sourced, never run. Uses no `local`: its scratch variables all
# start with _nr_.
#
#   nbdroot_parse "$(cat /proc/cmdline)"
#     0: a root over NBD was asked for and every nbdroot option is valid
#     1: nothing for us (neither nbdroot= nor root=nbd:)
#     2: malformed; NBDROOT_ERROR says why
#
# Accepted (the last occurrence of a parameter wins, as in the kernel):
#   nbdroot=<server>[:<port>]/<export>          Debian-style
#   root=nbd:<server>[:<port>]/<export>[:<fstype>[:<opts>]]   dracut-style
#       (nbdroot= wins when both are there; root=/dev/nbd0 is ignored)
#   <server> is a host name, an IPv4 address or [IPv6]; <port> 1-65535,
#   default 10809. <export> is <image> or <image>/<node>: names of
#   letters, digits, '.', '_' and '-', not starting with '.'.
#   nbdroot.node=<id>        node id; default: the boot interface's MAC,
#                            52-54-00-12-34-56 (nbdroot_mac_to_id)
#   nbdroot.servers=a[:p],b  more servers, tried in order after the first;
#                            a missing port is the first server's port
#   nbdroot.mode=persistent|ephemeral   (default persistent)
#   nbdroot.retries=N        rounds over all servers (default 5, 1-100)
#   nbdroot.timeout=S        seconds before a request the server has not
#                            answered is sent again on a new connection
#                            (nbdroot-keeper; default 0 = 15 s). Without the
#                            keeper (nbdroot.netlink=0): nbd-client -timeout,
#                            which fails the connection (0: wait forever)
#   nbdroot.shell[=1|0]      on failure, a shell instead of panic/reboot
#   nbdroot.netlink=0|1      nbd-client's netlink interface (default 1). 0: the
#                            ioctl one with a resident nbd-client (-persist);
#                            see README.md for why netlink is the default
#   nbdroot.blocksize=N      nbd-client -block-size: 512, 1024, 2048 or 4096
#   nbdroot.agent=on|off     the node agent (nbdroot-agent), when the initrd
#                            has it (default on): /dev/nbd0 talks to it on a
#                            Unix socket, it talks to the servers and peers
#   nbdroot.peers=on|off     the agent reads clean chunks from peers and
#                            serves them (default on; needs nbdroot.tracker)
#   nbdroot.tracker=H:P      the server's HTTP API (host, IPv4 or [IPv6], with
#                            a port); without it the agent runs with peers off
#   nbdroot.cache=SIZE       the agent's chunk cache: N, NK, NM or NG
#                            (default 64M)
#   nbdroot.peer_port=P      where the agent serves peers (default 10809)
#   nbdroot.tls=off|require  require: every connection to the servers over
#                            TLS with the node's key (needs nbdroot.key=).
#                            Turns the agent on whatever nbdroot.agent= says:
#                            the kernel cannot do TLS
#   nbdroot.key=NODE:HEX     the node's pre-shared key, as psktool and
#                            `nbdserver admin key NODE` write it: the node id,
#                            ':', 64 hex digits. Only with nbdroot.tls=require.
#                            Never echoed in a message (see docs/security.md:
#                            /proc/cmdline is readable by every local user)
#   rootfstype=, rootflags=, ro, rw, panic=N, ip=...   (kernel's own)
#
# Results (all set, possibly empty):
#   NBDROOT_SERVERS  "host:port host:port ..." ([v6]:port for IPv6)
#   NBDROOT_IMAGE NBDROOT_NODE NBDROOT_EXPORT (NBDROOT_EXPORT is empty
#   until the node id is known: nbdroot_export does that)
#   NBDROOT_FSTYPE (ext4) NBDROOT_FSOPTS NBDROOT_RO (0|1) NBDROOT_MODE
#   NBDROOT_RETRIES NBDROOT_TIMEOUT NBDROOT_SHELL (0|1) NBDROOT_PANIC
#   NBDROOT_NETLINK (0|1) NBDROOT_BLOCKSIZE
#   NBDROOT_AGENT NBDROOT_PEERS (on|off) NBDROOT_TRACKER (host:port or
#   empty) NBDROOT_CACHE NBDROOT_PEER_PORT
#   NBDROOT_TLS (off|require) NBDROOT_KEY (NODE:HEX, or empty) NBDROOT_KEY_ID
#   (its NODE)
#   NBDROOT_MODE_GIVEN (1 when nbdroot.mode= was there: the node then tells
#   the server its mode, see nbdroot_attach)
#   NBDROOT_IP (raw ip= value) and, from it, NBDROOT_IP_METHOD (dhcp|static|off)
#   NBDROOT_IP_ADDR NBDROOT_IP_GW NBDROOT_IP_MASK NBDROOT_IP_DEV NBDROOT_IP_DNS

NBDROOT_DEFAULT_PORT=10809

# nbdroot_valid_name NAME: a store name as nbdserver accepts it.
nbdroot_valid_name() {
	case $1 in
	'' | .* | *[!A-Za-z0-9._-]*) return 1 ;;
	esac
	[ ${#1} -le 200 ]
}

# nbdroot_valid_port P
nbdroot_valid_port() {
	case $1 in
	'' | *[!0-9]* | 0*) return 1 ;;
	esac
	[ ${#1} -le 5 ] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]
}

# nbdroot_valid_uint N MAX
nbdroot_valid_uint() {
	case $1 in
	'' | *[!0-9]*) return 1 ;;
	esac
	[ ${#1} -le 6 ] && [ "$1" -le "$2" ]
}

# nbdroot_split_server TEXT DEFAULT_PORT: sets _nr_host and _nr_port from
# host, host:port, [v6] or [v6]:port. Returns 1 when malformed.
nbdroot_split_server() {
	_nr_host=
	_nr_port=$2
	case $1 in
	\[*\]) _nr_host=${1#\[}; _nr_host=${_nr_host%\]} ;;
	\[*\]:*)
		_nr_host=${1#\[}; _nr_host=${_nr_host%%\]*}
		_nr_port=${1##*\]:} ;;
	\[* | *\]*) return 1 ;;
	*:*:*) return 1 ;;  # a bare IPv6 address needs brackets
	*:*) _nr_host=${1%%:*}; _nr_port=${1#*:} ;;
	*) _nr_host=$1 ;;
	esac
	nbdroot_valid_port "$_nr_port" || return 1
	case $1 in
	\[*)
		case $_nr_host in
		'' | *[!0-9A-Fa-f:.]* | *:*:*:*:*:*:*:*:*:*) return 1 ;;
		*:*) _nr_host="[$_nr_host]" ;;
		*) return 1 ;;
		esac ;;
	*)
		case $_nr_host in
		'' | -* | .* | *..* | *[!A-Za-z0-9.-]*) return 1 ;;
		esac ;;
	esac
	return 0
}

# nbdroot_mac_to_id MAC: 52:54:00:AB:cd:ef -> 52-54-00-ab-cd-ef
nbdroot_mac_to_id() {
	case $1 in
	[0-9A-Fa-f][0-9A-Fa-f]:[0-9A-Fa-f][0-9A-Fa-f]:[0-9A-Fa-f][0-9A-Fa-f]:[0-9A-Fa-f][0-9A-Fa-f]:[0-9A-Fa-f][0-9A-Fa-f]:[0-9A-Fa-f][0-9A-Fa-f]) ;;
	*) return 1 ;;
	esac
	echo "$1" | tr 'A-F:' 'a-f-'
}

# nbdroot_export: NBDROOT_EXPORT from NBDROOT_IMAGE and NBDROOT_NODE.
# Returns 1 while the node id is unknown.
nbdroot_export() {
	[ -n "$NBDROOT_NODE" ] || return 1
	NBDROOT_EXPORT="$NBDROOT_IMAGE/$NBDROOT_NODE"
}

_nr_fail() {
	NBDROOT_ERROR=$1
	return 2
}

# _nr_target TEXT WHAT: parses <server>[:<port>]/<export> into
# _nr_primary, NBDROOT_IMAGE and (when the export names one) _nr_enode.
_nr_target() {
	case $1 in
	*/*) ;;
	*) _nr_fail "$2: expected <server>[:<port>]/<image>, got '$1'"; return 2 ;;
	esac
	_nr_srv=${1%%/*}
	_nr_exp=${1#*/}
	nbdroot_split_server "$_nr_srv" "$NBDROOT_DEFAULT_PORT" ||
		{ _nr_fail "$2: bad server '$_nr_srv' (host, IPv4, [IPv6], optional :port 1-65535)"; return 2; }
	_nr_primary="$_nr_host:$_nr_port"
	_nr_enode=
	case $_nr_exp in
	*/*/*) _nr_fail "$2: bad export '$_nr_exp' (<image> or <image>/<node>)"; return 2 ;;
	*/*) _nr_enode=${_nr_exp#*/}; _nr_exp=${_nr_exp%%/*} ;;
	esac
	nbdroot_valid_name "$_nr_exp" ||
		{ _nr_fail "$2: bad image name '$_nr_exp' (letters, digits, . _ -)"; return 2; }
	if [ -n "$_nr_enode" ] || [ "${1%/}" != "$1" ]; then
		nbdroot_valid_name "$_nr_enode" ||
			{ _nr_fail "$2: bad node name '$_nr_enode' (letters, digits, . _ -)"; return 2; }
	fi
	NBDROOT_IMAGE=$_nr_exp
	return 0
}

# _nr_ip VALUE: the kernel's ip= (and dracut's ip=<dev>:dhcp).
_nr_ip() {
	NBDROOT_IP_METHOD=dhcp NBDROOT_IP_ADDR= NBDROOT_IP_GW= NBDROOT_IP_MASK=
	NBDROOT_IP_DEV= NBDROOT_IP_DNS=
	case $1 in
	'' | dhcp | on | any | both | bootp | rarp) return 0 ;;
	off | none) NBDROOT_IP_METHOD=off; return 0 ;;
	*:*:*) ;;
	*:dhcp | *:on | *:any) NBDROOT_IP_DEV=${1%:*}; return 0 ;;
	*:*) _nr_fail "ip=: unknown value '$1'"; return 2 ;;
	*) _nr_fail "ip=: unknown value '$1'"; return 2 ;;
	esac
	# client:server:gw:netmask:hostname:device:autoconf:dns0:dns1
	_nr_old=$IFS
	IFS=:
	# shellcheck disable=SC2086
	set -- $1
	IFS=$_nr_old
	case ${7:-} in
	dhcp | on | any | both | bootp)
		NBDROOT_IP_METHOD=dhcp NBDROOT_IP_DEV=${6:-}; return 0 ;;
	'' | off | none | static) ;;
	*) _nr_fail "ip=: unknown autoconf '$7'"; return 2 ;;
	esac
	NBDROOT_IP_METHOD=static
	NBDROOT_IP_ADDR=${1:-} NBDROOT_IP_GW=${3:-} NBDROOT_IP_MASK=${4:-}
	NBDROOT_IP_DEV=${6:-} NBDROOT_IP_DNS="${8:-} ${9:-}"
	NBDROOT_IP_DNS=${NBDROOT_IP_DNS% }
	NBDROOT_IP_DNS=${NBDROOT_IP_DNS# }
	for _nr_a in "$NBDROOT_IP_ADDR" "$NBDROOT_IP_GW" "$NBDROOT_IP_MASK"; do
		[ -z "$_nr_a" ] && continue
		_nr_ipv4 "$_nr_a" || { _nr_fail "ip=: bad IPv4 address '$_nr_a'"; return 2; }
	done
	[ -n "$NBDROOT_IP_ADDR" ] || { _nr_fail "ip=: static configuration without an address"; return 2; }
	return 0
}

_nr_ipv4() {
	case $1 in
	*[!0-9.]* | .* | *. | *..*) return 1 ;;
	esac
	_nr_old=$IFS
	IFS=.
	# shellcheck disable=SC2086
	set -- $1
	IFS=$_nr_old
	[ $# -eq 4 ] || return 1
	for _nr_o in "$@"; do
		[ ${#_nr_o} -le 3 ] && [ "$_nr_o" -le 255 ] || return 1
	done
}

# _nr_tls: nbdroot.tls= and nbdroot.key= (in _nr_key) checked together.
# Messages never quote the key.
_nr_tls() {
	if [ "${_nr_has#*key}" != "$_nr_has" ]; then
		[ "$NBDROOT_TLS" = require ] ||
			{ _nr_fail "nbdroot.key= is for nbdroot.tls=require (TLS is off)"; return 2; }
		case $_nr_key in
		*:*) ;;
		*) _nr_fail "nbdroot.key: expected NODE:HEX (the node id, ':', 64 hex digits)"; return 2 ;;
		esac
		NBDROOT_KEY_ID=${_nr_key%%:*}
		_nr_hex=${_nr_key#*:}
		nbdroot_valid_name "$NBDROOT_KEY_ID" ||
			{ _nr_fail "nbdroot.key: expected NODE:HEX, and NODE is not a node id (letters, digits, . _ -)"; return 2; }
		case $_nr_hex in
		*[!0-9A-Fa-f]*) _nr_fail "nbdroot.key: the key after '$NBDROOT_KEY_ID:' is not hex digits"; return 2 ;;
		esac
		[ ${#_nr_hex} -eq 64 ] ||
			{ _nr_fail "nbdroot.key: the key after '$NBDROOT_KEY_ID:' has ${#_nr_hex} hex digits, not 64 (256 bits)"; return 2; }
		[ -z "$NBDROOT_NODE" ] || [ "$NBDROOT_NODE" = "$NBDROOT_KEY_ID" ] ||
			{ _nr_fail "nbdroot.key is for node '$NBDROOT_KEY_ID', and this node is '$NBDROOT_NODE'"; return 2; }
		NBDROOT_KEY=$_nr_key
	fi
	if [ "$NBDROOT_TLS" = require ]; then
		[ -n "$NBDROOT_KEY" ] ||
			{ _nr_fail "nbdroot.tls=require, and no nbdroot.key=NODE:HEX: this boot got no key (on the server: nbdserver admin key NODE --arm, then boot again)"; return 2; }
		NBDROOT_AGENT=on  # the kernel cannot do TLS; the agent holds the connection
	fi
	return 0
}

# nbdroot_parse CMDLINE: see the top of this file.
nbdroot_parse() {
	NBDROOT_SERVERS= NBDROOT_IMAGE= NBDROOT_NODE= NBDROOT_EXPORT= NBDROOT_ERROR=
	NBDROOT_FSTYPE=ext4 NBDROOT_FSOPTS= NBDROOT_RO=0 NBDROOT_MODE=persistent NBDROOT_MODE_GIVEN=0
	NBDROOT_RETRIES=5 NBDROOT_TIMEOUT=0 NBDROOT_SHELL=0 NBDROOT_PANIC= NBDROOT_IP=
	NBDROOT_NETLINK=1 NBDROOT_BLOCKSIZE=
	NBDROOT_AGENT=on NBDROOT_PEERS=on NBDROOT_TRACKER= NBDROOT_CACHE=64M NBDROOT_PEER_PORT=10809
	NBDROOT_TLS=off NBDROOT_KEY= NBDROOT_KEY_ID=
	_nr_tracker= _nr_peer_port= _nr_key=
	_nr_deb= _nr_dracut= _nr_node= _nr_more= _nr_fstype= _nr_fsopts= _nr_any=0
	_nr_mode= _nr_retries= _nr_timeout= _nr_has=
	_nr_glob=
	case $- in *f*) _nr_glob=f ;; esac
	set -f
	for _nr_w in $1; do
		case $_nr_w in
		nbdroot=*) _nr_deb=${_nr_w#nbdroot=}; _nr_has="$_nr_has deb" ;;
		root=nbd:*) _nr_dracut=${_nr_w#root=nbd:}; _nr_has="$_nr_has dracut" ;;
		nbdroot.node=*) _nr_node=${_nr_w#*=}; _nr_any=1; _nr_has="$_nr_has node" ;;
		nbdroot.servers=*) _nr_more=${_nr_w#*=}; _nr_any=1 ;;
		nbdroot.mode=*) _nr_mode=${_nr_w#*=}; _nr_any=1; _nr_has="$_nr_has mode" ;;
		nbdroot.retries=*) _nr_retries=${_nr_w#*=}; _nr_any=1 ;;
		nbdroot.timeout=*) _nr_timeout=${_nr_w#*=}; _nr_any=1 ;;
		nbdroot.shell | nbdroot.shell=1 | nbdroot.shell=yes | nbdroot.shell=y) NBDROOT_SHELL=1 ;;
		nbdroot.shell=0 | nbdroot.shell=no | nbdroot.shell=n) NBDROOT_SHELL=0 ;;
		nbdroot.netlink=0 | nbdroot.netlink=1) NBDROOT_NETLINK=${_nr_w#*=} ;;
		nbdroot.blocksize=512 | nbdroot.blocksize=1024 | nbdroot.blocksize=2048 | nbdroot.blocksize=4096)
			NBDROOT_BLOCKSIZE=${_nr_w#*=}; _nr_any=1 ;;
		nbdroot.agent=on | nbdroot.agent=off) NBDROOT_AGENT=${_nr_w#*=} ;;
		nbdroot.peers=on | nbdroot.peers=off) NBDROOT_PEERS=${_nr_w#*=} ;;
		nbdroot.tracker=*) _nr_tracker=${_nr_w#*=}; _nr_any=1; _nr_has="$_nr_has tracker" ;;
		nbdroot.peer_port=*) _nr_peer_port=${_nr_w#*=}; _nr_any=1; _nr_has="$_nr_has pport" ;;
		nbdroot.tls=off | nbdroot.tls=require) NBDROOT_TLS=${_nr_w#*=}; _nr_any=1 ;;
		nbdroot.key=*) _nr_key=${_nr_w#*=}; _nr_any=1; _nr_has="$_nr_has key" ;;
		nbdroot.cache=[1-9]* | nbdroot.cache=0)
			_nr_c=${_nr_w#*=}
			case ${_nr_c%[KMG]} in
			'' | *[!0-9]*) [ -z "$_nr_glob" ] && set +f
				_nr_fail "nbdroot.cache: expected a size (N, NK, NM or NG), got '$_nr_c'"; return 2 ;;
			esac
			[ ${#_nr_c} -le 12 ] || { [ -z "$_nr_glob" ] && set +f
				_nr_fail "nbdroot.cache: too large: '$_nr_c'"; return 2; }
			NBDROOT_CACHE=$_nr_c; _nr_any=1 ;;
		nbdroot.agent=* | nbdroot.peers=*) [ -z "$_nr_glob" ] && set +f
			_nr_fail "${_nr_w%%=*}: expected on or off, got '${_nr_w#*=}'"; return 2 ;;
		nbdroot.tls=*) [ -z "$_nr_glob" ] && set +f
			_nr_fail "nbdroot.tls: expected off or require, got '${_nr_w#*=}'"; return 2 ;;
		nbdroot.cache=*) [ -z "$_nr_glob" ] && set +f
			_nr_fail "nbdroot.cache: expected a size (N, NK, NM or NG), got '${_nr_w#*=}'"; return 2 ;;
		nbdroot.netlink=* | nbdroot.blocksize=*) [ -z "$_nr_glob" ] && set +f
			_nr_fail "${_nr_w%%=*}: bad value '${_nr_w#*=}'"; return 2 ;;
		nbdroot.shell=*) [ -z "$_nr_glob" ] && set +f
			_nr_fail "nbdroot.shell: expected 1 or 0, got '${_nr_w#*=}'"; return 2 ;;
		# The verification initrd's own (docs/verification.md): a server's
		# --boot-cmdline may give them to every boot, so the root's initrd
		# lets them pass.
		nbdroot.verify=* | nbdroot.run=* | nbdroot.reserve=* | nbdroot.stress=* | \
		nbdroot.after=* | nbdroot.heartbeat=* | nbdroot.memtester_mask=* | \
		nbdroot.memtester_loops=* | nbdroot.fake_memtester_fail=*) ;;
		nbdroot.*) [ -z "$_nr_glob" ] && set +f
			_nr_fail "unknown parameter '${_nr_w%%=*}'"; return 2 ;;
		rootfstype=*) _nr_fstype=${_nr_w#*=} ;;
		rootflags=*) _nr_fsopts=${_nr_w#*=} ;;
		ro) NBDROOT_RO=1 ;;
		rw) NBDROOT_RO=0 ;;
		panic=*) NBDROOT_PANIC=${_nr_w#*=} ;;
		ip=*) NBDROOT_IP=${_nr_w#ip=} ;;
		esac
	done
	[ -z "$_nr_glob" ] && set +f
	case $_nr_has in
	*deb* | *dracut*) ;;
	*)
		[ "$_nr_any" = 1 ] && { _nr_fail "nbdroot.* given without nbdroot= or root=nbd:"; return 2; }
		return 1 ;;
	esac

	if [ "${_nr_has#*deb}" != "$_nr_has" ]; then
		_nr_target "$_nr_deb" nbdroot= || return 2
	else
		# <server>[:<port>]/<export>[:<fstype>[:<opts>]]; the server part may
		# hold colons, the export never does.
		_nr_t=${_nr_dracut#*/}
		_nr_head=${_nr_dracut%%/*}
		case $_nr_t in
		*:*:*) _nr_fstype=${_nr_t#*:}; _nr_fsopts=${_nr_fstype#*:}; _nr_fstype=${_nr_fstype%%:*}
			_nr_t=${_nr_t%%:*} ;;
		*:*) _nr_fstype=${_nr_t#*:}; _nr_t=${_nr_t%%:*} ;;
		esac
		[ "$_nr_head" = "$_nr_dracut" ] && _nr_t=
		_nr_target "$_nr_head/$_nr_t" root=nbd: || return 2
	fi
	NBDROOT_SERVERS=$_nr_primary
	_nr_dport=${_nr_primary##*:}

	if [ "${_nr_has#*node}" != "$_nr_has" ]; then
		nbdroot_valid_name "$_nr_node" ||
			{ _nr_fail "nbdroot.node: bad node id '$_nr_node' (letters, digits, . _ -)"; return 2; }
		[ -n "$_nr_enode" ] && [ "$_nr_enode" != "$_nr_node" ] &&
			{ _nr_fail "export names node '$_nr_enode' but nbdroot.node=$_nr_node"; return 2; }
		NBDROOT_NODE=$_nr_node
	else
		NBDROOT_NODE=$_nr_enode
	fi

	if [ -n "$_nr_more" ]; then
		_nr_old=$IFS
		IFS=,
		set -f
		for _nr_s in $_nr_more ''; do
			[ -z "$_nr_s" ] && continue
			IFS=$_nr_old
			nbdroot_split_server "$_nr_s" "$_nr_dport" ||
				{ [ -z "$_nr_glob" ] && set +f
				  _nr_fail "nbdroot.servers: bad server '$_nr_s'"; return 2; }
			case " $NBDROOT_SERVERS " in
			*" $_nr_host:$_nr_port "*) ;;
			*) NBDROOT_SERVERS="$NBDROOT_SERVERS $_nr_host:$_nr_port" ;;
			esac
		done
		IFS=$_nr_old
		[ -z "$_nr_glob" ] && set +f
		case ,$_nr_more, in
		*,,*) _nr_fail "nbdroot.servers: empty entry in '$_nr_more'"; return 2 ;;
		esac
	fi

	NBDROOT_MODE_GIVEN=1
	[ "${_nr_has#*mode}" = "$_nr_has" ] && { _nr_mode=persistent; NBDROOT_MODE_GIVEN=0; }
	case $_nr_mode in
	persistent | ephemeral) NBDROOT_MODE=$_nr_mode ;;
	*) _nr_fail "nbdroot.mode: expected persistent or ephemeral, got '$_nr_mode'"; return 2 ;;
	esac
	if [ -n "$_nr_retries" ]; then
		nbdroot_valid_uint "$_nr_retries" 100 && [ "$_nr_retries" -ge 1 ] ||
			{ _nr_fail "nbdroot.retries: expected 1-100, got '$_nr_retries'"; return 2; }
		NBDROOT_RETRIES=$((_nr_retries + 0))
	fi
	if [ -n "$_nr_timeout" ]; then
		nbdroot_valid_uint "$_nr_timeout" 86400 ||
			{ _nr_fail "nbdroot.timeout: expected seconds 0-86400, got '$_nr_timeout'"; return 2; }
		NBDROOT_TIMEOUT=$((_nr_timeout + 0))
	fi
	if [ "${_nr_has#*tracker}" != "$_nr_has" ]; then
		nbdroot_split_server "$_nr_tracker" "" ||
			{ _nr_fail "nbdroot.tracker: expected <host>:<port>, got '$_nr_tracker'"; return 2; }
		NBDROOT_TRACKER="$_nr_host:$_nr_port"
	fi
	if [ "${_nr_has#*pport}" != "$_nr_has" ]; then
		nbdroot_valid_port "$_nr_peer_port" ||
			{ _nr_fail "nbdroot.peer_port: expected 1-65535, got '$_nr_peer_port'"; return 2; }
		NBDROOT_PEER_PORT=$_nr_peer_port
	fi
	_nr_tls || return 2
	case $NBDROOT_PANIC in
	'' | -[0-9] | -[0-9][0-9] | -[0-9][0-9][0-9]) ;;
	*[!0-9]*) _nr_fail "panic=: expected seconds, got '$NBDROOT_PANIC'"; return 2 ;;
	esac
	[ -n "$_nr_fstype" ] && NBDROOT_FSTYPE=$_nr_fstype
	case $NBDROOT_FSTYPE in
	*[!a-z0-9._-]*) _nr_fail "bad filesystem type '$NBDROOT_FSTYPE'"; return 2 ;;
	esac
	NBDROOT_FSOPTS=$_nr_fsopts
	_nr_ip "$NBDROOT_IP" || return 2
	nbdroot_export || true
	return 0
}

# nbdroot_dump: every result as NAME=value, one a line (for tests and logs),
# but the key: NBDROOT_KEY_ID says whose it is.
nbdroot_dump() {
	for _nr_v in SERVERS IMAGE NODE EXPORT FSTYPE FSOPTS RO MODE MODE_GIVEN RETRIES TIMEOUT \
		SHELL PANIC NETLINK BLOCKSIZE AGENT PEERS TRACKER CACHE PEER_PORT TLS KEY_ID IP IP_METHOD IP_ADDR IP_GW IP_MASK IP_DEV IP_DNS ERROR; do
		eval "echo \"NBDROOT_$_nr_v=\${NBDROOT_$_nr_v:-}\""
	done
}
