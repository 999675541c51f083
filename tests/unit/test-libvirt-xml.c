/* test-libvirt-xml: the domain XML daemon/proc/libvirt.c gives libvirt for
 * a VM (lv_domain_xml): disks on the NBD exports (or qcow2 overlays over
 * them for a failover), vmreplica's networks as libvirt interfaces, and
 * names and paths escaped.  VMREPLICA_DUMP_XML=1 prints the XML (the
 * examples of docs/libvirt.md). */
#include <stdlib.h>

#include "config.h"
#include "proc/libvirt.h"
#include "tap.h"

static bool
has(const char *xml, const char *s)
{
    bool r = strstr(xml, s) != NULL;
    if (!r)
        printf("# missing: %s\n", s);
    return r;
}

static void
spec_of(struct vmproc_spec *s, struct vmproc_disk *d)
{
    d[0] = (struct vmproc_disk){ "disk0", "/var/lib/vm/disk0.raw" };
    d[1] = (struct vmproc_disk){ "disk1", "/var/lib/vm/disk1.raw" };
    *s = (struct vmproc_spec){ .name = "web & db <1>",
                               .uuid = "5f0c2d7e-8a4b-4f7e-9b1a-2c3d4e5f6a7b",
                               .cpus = 2,
                               .memory_mib = 1024,
                               .rundir = "/var/lib/vmreplica/run/it's",
                               .ndisks = 2,
                               .disks = d,
                               .hypervisor = true,
                               .hv = VMPROC_HV_LIBVIRT,
                               .nnics = 2 };
    snprintf(s->nic_mac[0], sizeof s->nic_mac[0], "52:54:00:12:34:56");
    snprintf(s->nic_net[0], sizeof s->nic_net[0], "bridge:br0");
    snprintf(s->nic_mac[1], sizeof s->nic_mac[1], "52:54:00:12:34:57");
    snprintf(s->nic_net[1], sizeof s->nic_net[1], "none");
}

int
main(void)
{
    plan_no_plan();
#if !HAVE_LIBVIRT
    ok(1, "# SKIP built without libvirt");
    return done_testing();
#else
    setenv("VMREPLICA_ACCEL", "tcg", 1);
    struct vmproc_disk d[2];
    struct vmproc_spec s;
    spec_of(&s, d);
    char *x = lv_domain_xml(&s);
    if (getenv("VMREPLICA_DUMP_XML"))
        printf("%s", x);
    ok(has(x, "<domain type=\"qemu\">"), "TCG: domain type qemu");
    ok(has(x, "<name>web &amp; db &lt;1&gt;</name>"), "name escaped");
    ok(has(x, "<memory unit=\"MiB\">1024</memory>") &&
           has(x, "<vcpu>2</vcpu>"),
       "memory and CPUs");
    ok(has(x, "<disk type=\"network\" device=\"disk\">") &&
           has(x, "<source protocol=\"nbd\" name=\"disk0\">") &&
           has(x, "<host transport=\"unix\" "
                  "socket=\"/var/lib/vmreplica/run/it's/nbd.sock\"/>") &&
           has(x, "<source protocol=\"nbd\" name=\"disk1\">"),
       "disks on the exports of RUNDIR/nbd.sock");
    ok(has(x, "<target dev=\"vda\" bus=\"virtio\"/>\n      <boot "
              "order=\"1\"/>") &&
           has(x, "<target dev=\"vdb\" bus=\"virtio\"/>\n    </disk>"),
       "boots from the first disk only");
    ok(has(x, "<interface type=\"bridge\">\n      <source bridge=\"br0\"/>") &&
           has(x, "<link state=\"down\"/>"),
       "bridge:br0 a bridge, none a NIC whose link is down");
    ok(has(x, "name=\"org.qemu.guest_agent.0\""), "guest agent channel");
    ok(!strstr(x, "qcow2"), "no overlay without s.overlays");
    free(x);

    s.overlays = true;
    s.name = "web - Test";
    x = lv_domain_xml(&s);
    if (getenv("VMREPLICA_DUMP_XML"))
        printf("%s", x);
    ok(has(x, "<driver name=\"qemu\" type=\"qcow2\"/>\n      <source "
              "file=\"/var/lib/vmreplica/run/it's/disk0.qcow2\"/>") &&
           has(x, "<backingStore type=\"network\">\n        <format "
                  "type=\"raw\"/>\n        <source protocol=\"nbd\" "
                  "name=\"disk0\">"),
       "failover: qcow2 overlays backed by the view's exports");
    free(x);

    s.overlays = false;
    s.kernel = "/boot/vmlinuz";
    s.cmdline = "console=ttyS0";
    x = lv_domain_xml(&s);
    ok(has(x, "<kernel>/boot/vmlinuz</kernel>") &&
           has(x, "<cmdline>console=ttyS0</cmdline>") &&
           !strstr(x, "<boot order"),
       "direct kernel boot, no disk boot order");
    free(x);
    return done_testing();
#endif
}
