/* libvirt.c: the libvirt hypervisor (libvirt.h).
 *
 * vmproc.c serves the disks with nbdkit in every case; here only the guest
 * differs: instead of QEMU started by hand, a libvirt domain whose disks are
 * the exports.  Every call opens its own connection to $VMREPLICA_LIBVIRT_URI
 * and closes it (libvirt is thread-safe; vmreplicad calls from several
 * threads), and libvirt's own error printing is silenced: its last error,
 * per thread, goes into vr_err().  Domain XML is built and edited with
 * libxml2's tree API, which escapes names and paths.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "libvirt.h"
#include "proc-int.h"

#define RECORD_MAX 512 /* bytes of RUNDIR/libvirt.domain */
#define POLL_MS    100

/* --- the record of our domain ------------------------------------------ */

static char *
record_path(const char *rundir)
{
    return xasprintf("%s/libvirt.domain", rundir);
}

/* The domain name in RUNDIR/libvirt.domain, or NULL; caller frees. */
static char *
record_read(const char *rundir)
{
    CLEANUP_FREE char *p = record_path(rundir);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    char buf[RECORD_MAX + 1];
    ssize_t n = read(fd, buf, RECORD_MAX);
    close(fd);
    if (n <= 0)
        return NULL;
    buf[n] = '\0';
    buf[strcspn(buf, "\n")] = '\0';
    return buf[0] ? xstrdup(buf) : NULL;
}

static int
record_write(const char *rundir, const char *name)
{
    CLEANUP_FREE char *p = record_path(rundir);
    CLEANUP_FREE char *line = xasprintf("%s\n", name);
    int rc = io_write_file_atomic(p, line, strlen(line));
    return rc < 0 ? err_wrap(rc, "record libvirt domain") : 0;
}

static void
record_remove(const char *rundir)
{
    CLEANUP_FREE char *p = record_path(rundir);
    unlink(p);
}

bool
lv_recorded(const char *rundir)
{
    CLEANUP_FREE char *p = record_path(rundir);
    return access(p, F_OK) == 0;
}

#if HAVE_LIBVIRT

#include <libvirt/libvirt-qemu.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <libxml/parser.h>
#include <libxml/tree.h>

static void
quiet(void *opaque VR_UNUSED, virErrorPtr e VR_UNUSED)
{
}

static void
init_once(void)
{
    virInitialize();
    virSetErrorFunc(NULL, quiet);
    xmlInitParser();
}

static const char *
lv_uri(void)
{
    const char *u = getenv("VMREPLICA_LIBVIRT_URI");
    return u && *u ? u : "qemu:///system";
}

/* vr_err(rc, "WHAT: libvirt's last error"). */
static int VR_PRINTF(2, 3)
lv_fail(int rc, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return vr_err(rc, "%s: %s", what, virGetLastErrorMessage());
}

static int
lv_open(virConnectPtr *c)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_once);
    *c = virConnectOpen(lv_uri());
    if (!*c)
        return lv_fail(-ECONNREFUSED, "libvirt %s: cannot connect (is "
                       "libvirtd running? $VMREPLICA_LIBVIRT_URI names "
                       "another)", lv_uri());
    return 0;
}

/* The domain of RUNDIR/libvirt.domain: 0 and *d, -ENOENT if none is
 * recorded or libvirt has no such domain (any more). */
static int
lv_recorded_domain(virConnectPtr c, const char *rundir, virDomainPtr *d,
                   char **name)
{
    *d = NULL;
    *name = record_read(rundir);
    if (!*name)
        return -ENOENT;
    *d = virDomainLookupByName(c, *name);
    if (*d)
        return 0;
    virErrorPtr e = virGetLastError();
    if (e && e->code == VIR_ERR_NO_DOMAIN)
        return -ENOENT;
    return lv_fail(-EIO, "libvirt: domain %s", *name);
}

/* --- the domain XML of a spec ------------------------------------------ */

static xmlNodePtr
add(xmlNodePtr parent, const char *name, const char *text)
{
    return xmlNewTextChild(parent, NULL, BAD_CAST name,
                           text ? BAD_CAST text : NULL);
}

static void
attr(xmlNodePtr n, const char *k, const char *v)
{
    xmlNewProp(n, BAD_CAST k, BAD_CAST v);
}

static bool
kvm_usable(void)
{
    const char *accel = getenv("VMREPLICA_ACCEL");
    if (accel && *accel)
        return strcmp(accel, "kvm") == 0;
    int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return false;
    close(fd);
    return true;
}

/* <source protocol='nbd' name=ID><host transport='unix' socket=.../>. */
static void
nbd_source(xmlNodePtr parent, const char *rundir, const char *id)
{
    CLEANUP_FREE char *sock = xasprintf("%s/nbd.sock", rundir);
    xmlNodePtr src = add(parent, "source", NULL);
    attr(src, "protocol", "nbd");
    attr(src, "name", id);
    xmlNodePtr h = add(src, "host", NULL);
    attr(h, "transport", "unix");
    attr(h, "socket", sock);
}

/* A raw disk on export id; the caller adds target and boot. */
static xmlNodePtr
nbd_disk(xmlNodePtr devs, const char *rundir, const char *id)
{
    xmlNodePtr d = add(devs, "disk", NULL);
    attr(d, "type", "network");
    attr(d, "device", "disk");
    xmlNodePtr drv = add(d, "driver", NULL);
    attr(drv, "name", "qemu");
    attr(drv, "type", "raw");
    nbd_source(d, rundir, id);
    return d;
}

/* RUNDIR/ID.qcow2 backed by export id (a failover's overlay). */
static xmlNodePtr
overlay_disk(xmlNodePtr devs, const char *rundir, const char *id)
{
    CLEANUP_FREE char *file = xasprintf("%s/%s.qcow2", rundir, id);
    xmlNodePtr d = add(devs, "disk", NULL);
    attr(d, "type", "file");
    attr(d, "device", "disk");
    xmlNodePtr drv = add(d, "driver", NULL);
    attr(drv, "name", "qemu");
    attr(drv, "type", "qcow2");
    attr(add(d, "source", NULL), "file", file);
    xmlNodePtr bs = add(d, "backingStore", NULL);
    attr(bs, "type", "network");
    attr(add(bs, "format", NULL), "type", "raw");
    nbd_source(bs, rundir, id);
    add(bs, "backingStore", NULL); /* the end of the chain */
    return d;
}

static void
disk_xml(xmlNodePtr devs, const struct vmproc_spec *s, unsigned i)
{
    const char *id = s->disks[i].id;
    xmlNodePtr d = s->overlays ? overlay_disk(devs, s->rundir, id)
                               : nbd_disk(devs, s->rundir, id);
    char dev[8];
    snprintf(dev, sizeof dev, "vd%c", 'a' + (int)i);
    xmlNodePtr t = add(d, "target", NULL);
    attr(t, "dev", dev);
    attr(t, "bus", "virtio");
    if (i == 0 && !s->kernel)
        attr(add(d, "boot", NULL), "order", "1");
}

/* vmreplica's networks (vm-network.c) as libvirt interfaces: "none" is a
 * NIC whose link is down. */
static void
nic_xml(xmlNodePtr devs, const char *mac, const char *net)
{
    xmlNodePtr n = add(devs, "interface", NULL);
    if (strncmp(net, "tap:", 4) == 0) {
        attr(n, "type", "ethernet");
        xmlNodePtr t = add(n, "target", NULL);
        attr(t, "dev", net + 4);
        attr(t, "managed", "no");
    } else if (strncmp(net, "bridge:", 7) == 0) {
        attr(n, "type", "bridge");
        attr(add(n, "source", NULL), "bridge", net + 7);
    } else {
        attr(n, "type", "user");
    }
    if (*mac)
        attr(add(n, "mac", NULL), "address", mac);
    attr(add(n, "model", NULL), "type", "virtio");
    if (strcmp(net, "none") == 0)
        attr(add(n, "link", NULL), "state", "down");
}

/* The guest agent's channel (libvirt connects to it). */
static void
agent_xml(xmlNodePtr devs)
{
    xmlNodePtr ch = add(devs, "channel", NULL);
    attr(ch, "type", "unix");
    xmlNodePtr t = add(ch, "target", NULL);
    attr(t, "type", "virtio");
    attr(t, "name", "org.qemu.guest_agent.0");
}

static void
os_xml(xmlNodePtr dom, const struct vmproc_spec *s)
{
    xmlNodePtr os = add(dom, "os", NULL);
    xmlNodePtr ty = add(os, "type", "hvm");
    attr(ty, "arch", "x86_64");
    attr(ty, "machine", "q35");
    if (s->kernel) {
        add(os, "kernel", s->kernel);
        if (s->initrd)
            add(os, "initrd", s->initrd);
        if (s->cmdline)
            add(os, "cmdline", s->cmdline);
    }
    add(add(dom, "features", NULL), "acpi", NULL);
}

static char *
doc_string(xmlDocPtr doc)
{
    xmlChar *buf = NULL;
    int len = 0;
    xmlDocDumpFormatMemory(doc, &buf, &len, 1);
    char *s = xstrdup(buf ? (const char *)buf : "");
    xmlFree(buf);
    return s;
}

char *
lv_domain_xml(const struct vmproc_spec *s)
{
    xmlDocPtr doc = xmlNewDoc(BAD_CAST "1.0");
    xmlNodePtr dom = xmlNewNode(NULL, BAD_CAST "domain");
    xmlDocSetRootElement(doc, dom);
    attr(dom, "type", kvm_usable() ? "kvm" : "qemu");
    add(dom, "name", s->name);
    if (s->uuid && *s->uuid)
        add(dom, "uuid", s->uuid);
    char num[32];
    snprintf(num, sizeof num, "%u", s->memory_mib ? s->memory_mib : 256);
    attr(add(dom, "memory", num), "unit", "MiB");
    snprintf(num, sizeof num, "%u", s->cpus ? s->cpus : 1);
    add(dom, "vcpu", num);
    os_xml(dom, s);
    add(dom, "on_poweroff", "destroy");
    add(dom, "on_reboot", "restart");
    add(dom, "on_crash", "destroy");
    xmlNodePtr devs = add(dom, "devices", NULL);
    CLEANUP_FREE char *emu = resolve_bin(qemu_bin());
    add(devs, "emulator", emu ? emu : qemu_bin());
    for (unsigned i = 0; i < s->ndisks; i++)
        disk_xml(devs, s, i);
    for (unsigned i = 0; i < s->nnics; i++)
        nic_xml(devs, s->nic_mac[i], s->nic_net[i]);
    CLEANUP_FREE char *console = xasprintf("%s/console.log", s->rundir);
    xmlNodePtr ser = add(devs, "serial", NULL);
    attr(ser, "type", "file");
    xmlNodePtr src = add(ser, "source", NULL);
    attr(src, "path", console);
    attr(src, "append", "on");
    attr(add(ser, "target", NULL), "port", "0");
    agent_xml(devs);
    char *out = doc_string(doc);
    xmlFreeDoc(doc);
    return out;
}

/* --- start, status, stop, agent ----------------------------------------- */

int
lv_start(const struct vmproc_spec *s)
{
    virConnectPtr c;
    int rc = lv_open(&c);
    if (rc < 0)
        return rc;
    const char *name = s->domain ? s->domain : s->name;
    rc = record_write(s->rundir, name);
    virDomainPtr d = NULL;
    if (rc == 0 && s->domain) {
        d = virDomainLookupByName(c, s->domain);
        if (!d)
            rc = lv_fail(-ENOENT, "libvirt: domain %s", s->domain);
        else if (virDomainCreate(d) < 0)
            rc = lv_fail(-EIO, "libvirt: start domain %s", s->domain);
    } else if (rc == 0) {
        CLEANUP_FREE char *xml = lv_domain_xml(s);
        d = virDomainCreateXML(c, xml, 0);
        if (!d)
            rc = lv_fail(-EIO, "libvirt: start domain %s", s->name);
    }
    if (rc < 0)
        record_remove(s->rundir);
    if (d)
        virDomainFree(d);
    virConnectClose(c);
    return rc;
}

bool
lv_running(const char *rundir)
{
    if (!lv_recorded(rundir))
        return false;
    virConnectPtr c;
    if (lv_open(&c) < 0) {
        vr_err_clear();
        return false;
    }
    virDomainPtr d;
    CLEANUP_FREE char *name = NULL;
    bool active = lv_recorded_domain(c, rundir, &d, &name) == 0 &&
                  virDomainIsActive(d) == 1;
    vr_err_clear();
    if (d)
        virDomainFree(d);
    virConnectClose(c);
    return active;
}

/* Wait until d is inactive, up to timeout_ms. */
static bool
wait_inactive(virDomainPtr d, unsigned timeout_ms)
{
    uint64_t deadline = vr_mono_ms() + timeout_ms;
    for (;;) {
        if (virDomainIsActive(d) == 0)
            return true;
        if (vr_mono_ms() >= deadline)
            return false;
        vr_sleep_ms(POLL_MS);
    }
}

int
lv_stop(const char *rundir, bool force, unsigned timeout_ms)
{
    if (!lv_recorded(rundir))
        return 0;
    virConnectPtr c;
    int rc = lv_open(&c);
    if (rc < 0)
        return rc;
    virDomainPtr d;
    CLEANUP_FREE char *name = NULL;
    rc = lv_recorded_domain(c, rundir, &d, &name);
    if (rc == -ENOENT) {
        rc = 0; /* gone already (a transient domain that shut down) */
    } else if (rc == 0 && virDomainIsActive(d) == 1) {
        bool gone = false;
        if (!force && virDomainShutdownFlags(
                          d, VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) == 0)
            gone = wait_inactive(d, timeout_ms);
        if (!gone && virDomainDestroy(d) < 0 && virDomainIsActive(d) != 0)
            rc = lv_fail(-EIO, "libvirt: destroy domain %s", name);
    }
    if (rc == 0) {
        vr_err_clear();
        record_remove(rundir);
    }
    if (d)
        virDomainFree(d);
    virConnectClose(c);
    return rc;
}

/* libvirt's error after a failed agent command, as vmproc_guest_call's. */
static int
agent_error(void)
{
    virErrorPtr e = virGetLastError();
    int code = e ? e->code : 0;
    if (code == VIR_ERR_AGENT_UNRESPONSIVE)
        return lv_fail(-ENOTCONN, "guest agent: not answering");
    if (code == VIR_ERR_OPERATION_TIMEOUT)
        return lv_fail(-ETIMEDOUT, "guest agent: no answer");
    if (code == VIR_ERR_OPERATION_INVALID)
        return lv_fail(-ENOENT, "guest agent: the VM does not run");
    return lv_fail(-EIO, "guest agent");
}

static int
agent_reply(const char *reply, json_object **ret)
{
    json_object *j = json_tokener_parse(reply), *v, *e;
    int rc = 0;
    if (j && json_object_object_get_ex(j, "return", &v))
        *ret = json_object_get(v);
    else if (j && json_object_object_get_ex(j, "error", &e) &&
             json_object_object_get_ex(e, "desc", &v))
        rc = vr_err(-EIO, "guest agent: %s", json_object_get_string(v));
    else
        rc = vr_err(-EPROTO, "guest agent: unexpected answer '%.80s'", reply);
    json_object_put(j);
    return rc;
}

int
lv_agent(const char *rundir, const char *cmd, unsigned timeout_ms,
         json_object **ret)
{
    *ret = NULL;
    virConnectPtr c;
    int rc = lv_open(&c);
    if (rc < 0)
        return rc;
    virDomainPtr d;
    CLEANUP_FREE char *name = NULL;
    rc = lv_recorded_domain(c, rundir, &d, &name);
    if (rc == -ENOENT)
        rc = vr_err(-ENOENT, "guest agent: the VM does not run");
    if (rc == 0) {
        int secs = (int)((timeout_ms + 999) / 1000);
        char *reply = virDomainQemuAgentCommand(d, cmd, secs ? secs : 1, 0);
        rc = reply ? agent_reply(reply, ret) : agent_error();
        free(reply);
    }
    if (d)
        virDomainFree(d);
    virConnectClose(c);
    return rc;
}

/* --- adoption ------------------------------------------------------------ */

static xmlNodePtr
child(xmlNodePtr n, const char *name)
{
    for (xmlNodePtr k = n ? n->children : NULL; k; k = k->next)
        if (k->type == XML_ELEMENT_NODE &&
            xmlStrcmp(k->name, BAD_CAST name) == 0)
            return k;
    return NULL;
}

/* An attribute's value or NULL; caller frees with free(). */
static char *
prop(xmlNodePtr n, const char *name)
{
    xmlChar *v = n ? xmlGetProp(n, BAD_CAST name) : NULL;
    char *s = v ? xstrdup((const char *)v) : NULL;
    xmlFree(v);
    return s;
}

static unsigned long long
text_ull(xmlNodePtr n, unsigned long long dflt)
{
    xmlChar *v = n ? xmlNodeGetContent(n) : NULL;
    unsigned long long r = v ? strtoull((const char *)v, NULL, 10) : dflt;
    xmlFree(v);
    return r;
}

/* A disk the guest sees as a disk (not a cdrom, floppy or lun). */
static bool
is_disk(xmlNodePtr n)
{
    if (n->type != XML_ELEMENT_NODE || xmlStrcmp(n->name, BAD_CAST "disk"))
        return false;
    CLEANUP_FREE char *dev = prop(n, "device");
    return !dev || strcmp(dev, "disk") == 0;
}

static int
adopt_disk(xmlNodePtr n, struct lv_adopt *a)
{
    if (a->ndisks >= MAX_DISKS)
        return vr_err(-EINVAL, "the domain has more than %d disks", MAX_DISKS);
    CLEANUP_FREE char *type = prop(n, "type");
    xmlNodePtr src = child(n, "source");
    char *path = NULL;
    if (type && strcmp(type, "file") == 0)
        path = prop(src, "file");
    else if (type && strcmp(type, "block") == 0)
        path = prop(src, "dev");
    else
        return vr_err(-ENOTSUP, "disk %u is of type %s: only file and block "
                      "disks can be adopted", a->ndisks, type ? type : "?");
    if (!path)
        return vr_err(-EINVAL, "disk %u has no source", a->ndisks);
    char *fmt = prop(child(n, "driver"), "type");
    a->path[a->ndisks] = path;
    a->format[a->ndisks] = fmt ? fmt : xstrdup("raw");
    a->in_place[a->ndisks] = strcmp(type, "file") == 0 &&
                             strcmp(a->format[a->ndisks], "raw") == 0;
    a->ndisks++;
    return 0;
}

/* libvirt's interface as a vmreplica network: bridge, user and ethernet
 * map; a libvirt network (or anything else) becomes "none". */
static void
adopt_nic(xmlNodePtr n, struct lv_adopt *a)
{
    if (json_object_array_length(a->nics) >= VMPROC_MAX_NICS)
        return;
    CLEANUP_FREE char *type = prop(n, "type");
    CLEANUP_FREE char *mac = prop(child(n, "mac"), "address");
    CLEANUP_FREE char *br = prop(child(n, "source"), "bridge");
    CLEANUP_FREE char *tap = prop(child(n, "target"), "dev");
    char *net;
    if (type && strcmp(type, "bridge") == 0 && br)
        net = xasprintf("bridge:%s", br);
    else if (type && strcmp(type, "user") == 0)
        net = xstrdup("user");
    else if (type && strcmp(type, "ethernet") == 0 && tap)
        net = xasprintf("tap:%s", tap);
    else
        net = xstrdup("none");
    json_object *o = json_object_new_object();
    json_object_object_add(o, "mac", json_object_new_string(mac ? mac : ""));
    json_object_object_add(o, "network", json_object_new_string(net));
    json_object_array_add(a->nics, o);
    free(net);
}

/* The memory element in MiB (libvirt writes KiB; unit= says otherwise). */
static unsigned
memory_mib(xmlNodePtr mem)
{
    unsigned long long v = text_ull(mem, 256ull << 10);
    CLEANUP_FREE char *unit = prop(mem, "unit");
    if (!unit || strcmp(unit, "KiB") == 0 || strcmp(unit, "k") == 0)
        return (unsigned)(v >> 10);
    if (strcmp(unit, "MiB") == 0 || strcmp(unit, "M") == 0)
        return (unsigned)v;
    if (strcmp(unit, "GiB") == 0 || strcmp(unit, "G") == 0)
        return (unsigned)(v << 10);
    return (unsigned)(v >> 20); /* bytes */
}

static int
adopt_parse(const char *xml, struct lv_adopt *a)
{
    xmlDocPtr doc = xmlReadMemory(xml, (int)strlen(xml), "domain.xml", NULL,
                                  XML_PARSE_NONET | XML_PARSE_NOWARNING |
                                      XML_PARSE_NOERROR);
    xmlNodePtr root = doc ? xmlDocGetRootElement(doc) : NULL;
    if (!root) {
        xmlFreeDoc(doc);
        return vr_err(-EPROTO, "the domain's XML does not parse");
    }
    a->cpus = (unsigned)text_ull(child(root, "vcpu"), 1);
    a->memory_mib = memory_mib(child(root, "memory"));
    a->nics = json_object_new_array();
    int rc = 0;
    xmlNodePtr devs = child(root, "devices");
    for (xmlNodePtr n = devs ? devs->children : NULL; rc == 0 && n;
         n = n->next) {
        if (is_disk(n))
            rc = adopt_disk(n, a);
        else if (n->type == XML_ELEMENT_NODE &&
                 xmlStrcmp(n->name, BAD_CAST "interface") == 0)
            adopt_nic(n, a);
    }
    if (rc == 0 && a->ndisks == 0)
        rc = vr_err(-EINVAL, "the domain has no disk");
    xmlFreeDoc(doc);
    return rc;
}

int
lv_adopt_read(const char *domain, struct lv_adopt *a)
{
    *a = (struct lv_adopt){ 0 };
    virConnectPtr c;
    int rc = lv_open(&c);
    if (rc < 0)
        return rc;
    virDomainPtr d = virDomainLookupByName(c, domain);
    if (!d)
        rc = lv_fail(-ENOENT, "libvirt: domain %s", domain);
    else if (virDomainIsActive(d) != 0)
        rc = vr_err(-EBUSY, "libvirt domain %s is running: shut it down "
                    "first (its disks must not change while vmreplica "
                    "takes them over)", domain);
    char *xml = NULL;
    if (rc == 0 && !(xml = virDomainGetXMLDesc(d, VIR_DOMAIN_XML_INACTIVE)))
        rc = lv_fail(-EIO, "libvirt: domain %s: XML", domain);
    if (rc == 0) {
        a->xml = xstrdup(xml);
        rc = adopt_parse(xml, a);
        if (rc < 0)
            rc = err_wrap(rc, "libvirt domain %s", domain);
    }
    free(xml);
    if (d)
        virDomainFree(d);
    virConnectClose(c);
    if (rc < 0)
        lv_adopt_fini(a);
    return rc;
}

void
lv_adopt_fini(struct lv_adopt *a)
{
    for (unsigned i = 0; i < a->ndisks; i++) {
        free(a->path[i]);
        free(a->format[i]);
    }
    json_object_put(a->nics);
    free(a->xml);
    *a = (struct lv_adopt){ 0 };
}

/* Put disk node old on export id: a new node with old's target, boot
 * order, address and serial. */
static void
disk_to_export(xmlNodePtr old, const char *rundir, const char *id)
{
    xmlNodePtr tmp = xmlNewNode(NULL, BAD_CAST "tmp");
    xmlNodePtr d = nbd_disk(tmp, rundir, id);
    static const char *const keep[] = { "target", "boot", "address", "serial",
                                        "alias" };
    for (size_t k = 0; k < ARRAY_SIZE(keep); k++) {
        xmlNodePtr c = child(old, keep[k]);
        if (c)
            xmlAddChild(d, xmlCopyNode(c, 1));
    }
    xmlUnlinkNode(d);
    xmlReplaceNode(old, d);
    xmlFreeNode(old);
    xmlFreeNode(tmp);
}

/* Whether devs has the guest agent's channel. */
static bool
has_agent(xmlNodePtr devs)
{
    for (xmlNodePtr n = devs->children; n; n = n->next) {
        if (n->type != XML_ELEMENT_NODE ||
            xmlStrcmp(n->name, BAD_CAST "channel"))
            continue;
        CLEANUP_FREE char *nm = prop(child(n, "target"), "name");
        if (nm && strcmp(nm, "org.qemu.guest_agent.0") == 0)
            return true;
    }
    return false;
}

static int
redefine_xml(const char *xml, const char *rundir, unsigned ndisks,
             const struct vmproc_disk *disks, char **out)
{
    xmlDocPtr doc = xmlReadMemory(xml, (int)strlen(xml), "domain.xml", NULL,
                                  XML_PARSE_NONET | XML_PARSE_NOWARNING |
                                      XML_PARSE_NOERROR);
    xmlNodePtr root = doc ? xmlDocGetRootElement(doc) : NULL;
    xmlNodePtr devs = child(root, "devices");
    if (!devs) {
        xmlFreeDoc(doc);
        return vr_err(-EPROTO, "the domain's XML has no devices");
    }
    unsigned i = 0;
    for (xmlNodePtr n = devs->children, next; n; n = next) {
        next = n->next;
        if (is_disk(n) && i < ndisks)
            disk_to_export(n, rundir, disks[i++].id);
    }
    if (!has_agent(devs))
        agent_xml(devs);
    *out = doc_string(doc);
    xmlFreeDoc(doc);
    return i == ndisks ? 0
                       : vr_err(-EINVAL, "the domain has %u disks, not %u", i,
                                ndisks);
}

int
lv_define(const char *xml)
{
    virConnectPtr c;
    int rc = lv_open(&c);
    if (rc < 0)
        return rc;
    virDomainPtr d = virDomainDefineXML(c, xml);
    if (!d)
        rc = lv_fail(-EIO, "libvirt: define domain");
    else
        virDomainFree(d);
    virConnectClose(c);
    return rc;
}

int
lv_adopt_redefine(const char *xml, const char *rundir, unsigned ndisks,
                  const struct vmproc_disk *disks)
{
    CLEANUP_FREE char *nx = NULL;
    int rc = redefine_xml(xml, rundir, ndisks, disks, &nx);
    if (rc == 0)
        rc = lv_define(nx);
    return rc < 0 ? err_wrap(rc, "redefine the domain on the exports") : 0;
}

#else /* !HAVE_LIBVIRT */

static int
no_libvirt(void)
{
    return vr_err(-ENOTSUP, "this vmreplicad was built without libvirt "
                  "(libvirt-dev, libxml2-dev)");
}

int
lv_start(const struct vmproc_spec *s VR_UNUSED)
{
    return no_libvirt();
}

bool
lv_running(const char *rundir VR_UNUSED)
{
    return false;
}

int
lv_stop(const char *rundir, bool force VR_UNUSED,
        unsigned timeout_ms VR_UNUSED)
{
    return lv_recorded(rundir) ? no_libvirt() : 0;
}

int
lv_agent(const char *rundir VR_UNUSED, const char *cmd VR_UNUSED,
         unsigned timeout_ms VR_UNUSED, json_object **ret)
{
    *ret = NULL;
    return no_libvirt();
}

char *
lv_domain_xml(const struct vmproc_spec *s VR_UNUSED)
{
    return xstrdup("");
}

int
lv_adopt_read(const char *domain VR_UNUSED, struct lv_adopt *a)
{
    *a = (struct lv_adopt){ 0 };
    return no_libvirt();
}

void
lv_adopt_fini(struct lv_adopt *a)
{
    *a = (struct lv_adopt){ 0 };
}

int
lv_define(const char *xml VR_UNUSED)
{
    return no_libvirt();
}

int
lv_adopt_redefine(const char *xml VR_UNUSED, const char *rundir VR_UNUSED,
                  unsigned ndisks VR_UNUSED,
                  const struct vmproc_disk *disks VR_UNUSED)
{
    return no_libvirt();
}

#endif
