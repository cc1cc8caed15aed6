// A JVM app shaped like a real one: an HTTP server holding ~300 MB of byte
// arrays in a HashMap, one thread that keeps starting short-lived threads
// and one that churns objects, so the collector and the thread list keep
// moving while memcr parks and wakes it. GET /digest hashes the whole map,
// GET /ping answers "pong". Prints "ready <pid>" once the map is full.
import com.sun.net.httpserver.HttpServer;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.Executors;

public class Server {
    static final int ENTRIES = 3000;
    static final int SIZE = 100_000;
    static final Map<Integer, byte[]> data = new HashMap<>();
    static volatile List<Object> garbage = new ArrayList<>();

    static byte[] value(int key) {
        byte[] bytes = new byte[SIZE];
        long x = key * 0x9E3779B97F4A7C15L;
        for (int i = 0; i < SIZE; i++) {
            x ^= x << 13; x ^= x >>> 7; x ^= x << 17;
            bytes[i] = (byte) x;
        }
        return bytes;
    }

    static synchronized String digest() throws Exception {
        MessageDigest md = MessageDigest.getInstance("SHA-256");
        for (int key = 0; key < ENTRIES; key++) {
            md.update(data.get(key));
        }
        StringBuilder out = new StringBuilder();
        for (byte b : md.digest()) out.append(String.format("%02x", b));
        return out.toString();
    }

    static void reply(com.sun.net.httpserver.HttpExchange ex, String body) throws java.io.IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        ex.sendResponseHeaders(200, bytes.length);
        try (OutputStream os = ex.getResponseBody()) { os.write(bytes); }
    }

    public static void main(String[] args) throws Exception {
        for (int key = 0; key < ENTRIES; key++) data.put(key, value(key));
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", Integer.parseInt(args[0])), 64);
        server.createContext("/ping", ex -> reply(ex, "pong"));
        server.createContext("/digest", ex -> {
            try { reply(ex, digest()); } catch (Exception e) { throw new java.io.IOException(e); }
        });
        server.setExecutor(Executors.newFixedThreadPool(4));
        server.start();
        Thread spawner = new Thread(() -> {
            while (true) {
                Thread t = new Thread(() -> {
                    byte[] scratch = new byte[64 * 1024];
                    scratch[scratch.length - 1] = 1;
                    if (scratch[0] != 0) throw new IllegalStateException("fresh array not zero");
                });
                t.start();
                try { t.join(); Thread.sleep(2); } catch (InterruptedException e) { return; }
            }
        });
        spawner.setDaemon(true);
        spawner.start();
        Thread churn = new Thread(() -> {
            long round = 0;
            while (true) {
                List<Object> next = new ArrayList<>();
                for (int i = 0; i < 2000; i++) next.add(new StringBuilder("object-").append(round).append('-').append(i).toString());
                garbage = next;
                if (!((String) garbage.get(1999)).equals("object-" + round + "-1999")) throw new IllegalStateException("churn list damaged");
                round++;
                try { Thread.sleep(1); } catch (InterruptedException e) { return; }
            }
        });
        churn.setDaemon(true);
        churn.start();
        System.out.println("ready " + ProcessHandle.current().pid());
        System.out.flush();
    }
}
