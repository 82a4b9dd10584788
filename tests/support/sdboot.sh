#!/bin/sh
# Boot systemd as PID 1 of the namespaces this runs in, without touching the machine.
#
# Run as the first process of `unshare --mount --pid --fork --cgroup --uts`, after the
# caller moved itself into a fresh child cgroup of the cgroup2 hierarchy:
#
#   sdboot.sh SHARE
#
# SHARE is a directory of the caller's; it appears inside at /run/host and at its own
# path, and systemd's own console output goes to SHARE/console.log.
#
# A booting systemd empties /tmp (tmpfiles), starts every enabled unit, writes /etc and
# /var, and on power-off unmounts and remounts file systems read-only. So before it runs:
# every mount here is private; /run, /tmp, /var/tmp, /home and systemd's own directories
# are fresh tmpfs; /etc and /var are overlays whose writes land in a tmpfs; /sys,
# /proc/sys and /dev are read-only; systemd is told it runs in a container (so its
# shutdown unmounts nothing and detaches no device); the units that set the machine up at
# boot are masked, and it boots a target of ours that wants only the journal.
set -eu

share=$1
[ "$$" = 1 ] || { echo "sdboot.sh: must run as PID 1 of a new PID namespace" >&2; exit 2; }
[ -d "$share" ] || { echo "sdboot.sh: $share is not a directory" >&2; exit 2; }

# Nothing mounted from here on propagates to the machine.
mount --make-rprivate /
mount -t proc -o nosuid,nodev,noexec proc /proc

mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir /run/host
mount --bind "$share" /run/host
share_path=$(cd "$share" && pwd -P)
share=/run/host  # the caller's path may be under /tmp, about to be covered
# The project (its virtualenv included) stays visible at its path, wherever it was cloned.
keep=${2:-}
if [ -n "$keep" ]; then
    mkdir /run/keep
    mount --bind "$keep" /run/keep
    keep_path=$(cd "$keep" && pwd -P)
fi

mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp

# /etc and /var: the machine's files, with every write kept in a tmpfs.
mkdir /run/overlay
mount -t tmpfs -o mode=0700 tmpfs /run/overlay
for dir in etc var; do
    mkdir -p "/run/overlay/$dir/upper" "/run/overlay/$dir/work"
    mount -t overlay overlay \
        -o "lowerdir=/$dir,upperdir=/run/overlay/$dir/upper,workdir=/run/overlay/$dir/work" "/$dir"
done
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
for dir in /etc/systemd/system /var/lib/systemd /home; do
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$dir"
done
if [ -d /var/log/journal ]; then
    mount -t tmpfs -o mode=2755,nosuid,nodev tmpfs /var/log/journal
fi

# The share at its own path too (it may have been under a directory covered above).
mkdir -p "$share_path"
mount --bind /run/host "$share_path"
if [ -n "$keep" ]; then
    mkdir -p "$keep_path"
    mount --bind /run/keep "$keep_path"
fi

# cgroup2 at /sys/fs/cgroup: the caller's cgroup is our root.
umount -R /sys/fs/cgroup
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup

# Kernel settings and devices stay as they are: bind-remount read-only (per mount point,
# never the file system's own flags).
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount -o remount,bind,ro /sys
: >"$share/console.log"
mount --bind "$share/console.log" /dev/console
mount --bind /dev/null /dev/kmsg
mount -o remount,bind,ro /dev

units=/run/systemd/system
mkdir -p "$units"
# Mask what would set up the machine (modules, sysctl, users, tmpfiles, devices, fstab).
for dir in /lib/systemd/system/sysinit.target.wants /usr/lib/systemd/system/sysinit.target.wants; do
    [ -d "$dir" ] || continue
    for unit in "$dir"/*; do
        name=${unit##*/}
        [ "$name" = systemd-journald.service ] || ln -sf /dev/null "$units/$name"
    done
done
for name in local-fs.target swap.target sockets.target timers.target paths.target getty.target \
        systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service systemd-tmpfiles-clean.service \
        systemd-tmpfiles-clean.timer systemd-sysctl.service systemd-sysusers.service systemd-modules-load.service \
        systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service systemd-remount-fs.service \
        systemd-fsck-root.service systemd-update-utmp.service systemd-update-utmp-runlevel.service \
        systemd-random-seed.service systemd-journal-flush.service systemd-timesyncd.service \
        systemd-pstore.service systemd-binfmt.service systemd-firstboot.service \
        systemd-machine-id-commit.service systemd-hwdb-update.service ldconfig.service \
        systemd-update-done.service systemd-journal-catalog-update.service systemd-logind.service \
        console-getty.service getty@.service tmp.mount; do
    ln -sf /dev/null "$units/$name"
done
cat >"$units/sdboot.target" <<'EOF'
[Unit]
Description=Test boot: the journal and nothing else
Wants=systemd-journald.service systemd-journald.socket
After=systemd-journald.service
AllowIsolate=yes
EOF

echo sdboot >/etc/hostname
hostname sdboot

exec env -i container=sdboot PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    /lib/systemd/systemd --system --unit=sdboot.target --show-status=0 --log-target=journal --log-level=info
