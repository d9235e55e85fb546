#!/bin/busybox sh
# /init of the VM row's initramfs (scripts/vm/build.py puts it there): busybox, the
# virtio modules, then vmbench on /dev/vda with the jobs and runtime from the kernel
# command line (vmbench.runtime=SECONDS vmbench.jobs=a,b,...), then power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || echo "VMBENCH-ERROR insmod $m"
done
runtime=5
jobs=seqwrite,randwrite,randwrite-fsync,randread
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmbench.runtime=*) runtime="${arg#vmbench.runtime=}" ;;
        vmbench.jobs=*) jobs="${arg#vmbench.jobs=}" ;;
    esac
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "VMBENCH-START $(cat /proc/uptime)"
if /bin/vmbench /dev/vda "$runtime" "$jobs"; then
    echo "VMBENCH-END ok"
else
    echo "VMBENCH-END failed"
fi
sync
poweroff -f
